"""Runs inside a started ComfyUI (see comfy_runner.py): in fp8 mode an attention's q, k and v
projections share one activation quantization, and the group's last member lets go of it on every
path it can take (a LoRA patch applied per layer, a LoRA merged into the weight), so that nothing an
earlier member quantized stays on the GPU until the next step.

The fp8 matmul itself needs an fp8 GPU (test_gpu); here the held quantization is planted as an
earlier member would leave it, and each path of the layers is run on the CPU.
"""

import torch

from script_helpers import loaded_module


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    ops, fp8 = pkg.nodes.integration.ops, pkg.loaders.quant.fp8
    g = torch.Generator().manual_seed(0)
    attn = torch.nn.Module()
    for name in ("to_q", "to_k", "to_v"):
        layer = ops.GGUFOps.Linear(64, 32, bias=False)
        raw = fp8.FP8Rows.encode(torch.randn(32, 64, generator=g))
        layer.load_state_dict({"weight": pkg.loaders.quant.weight.wrap(raw, fp8.FP8Rows, (32, 64))})
        setattr(attn, name, layer)
    result = {"groups": ops.share_inputs(attn),
              "last": [attn.to_q.plan.last, attn.to_k.plan.last, attn.to_v.plan.last],
              "one_object": len({id(attn.to_q.plan.shared), id(attn.to_k.plan.shared),
                                 id(attn.to_v.plan.shared)}) == 1}
    shared, x = attn.to_v.plan.shared, torch.randn(3, 64, generator=g)

    def plant():
        shared.source, shared.quantized = x, (torch.zeros(1), torch.ones(1))

    with torch.no_grad():
        plant()
        attn.to_k.weight_function = [lambda w: w * 2]  # an earlier member patched: it leaves the quantization
        attn.to_k(x)
        result["kept_by_earlier_member"] = shared.source is x
        attn.to_k.weight_function = []
        attn.to_v.weight_function = [lambda w: w * 2]
        patched = attn.to_v(x)
        result["released_when_last_is_patched"] = shared.source is None and shared.quantized is None
        expected = x @ (2 * fp8.FP8Rows.dequantize(attn.to_v.weight, (32, 64), torch.float32)).T
        result["patched_output_error"] = float((patched - expected).abs().max())
        attn.to_v.weight_function = []
        plant()
        attn.to_v.set_weight(fp8.FP8Rows.dequantize(attn.to_v.weight, (32, 64), torch.float32) * 2)  # merged
        attn.to_v(x)
        result["released_when_last_is_merged"] = shared.source is None and shared.quantized is None
    return result
