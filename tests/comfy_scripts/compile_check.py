"""Runs inside a started ComfyUI (see comfy_runner.py): our GGUF Linear layers under torch.compile.

ComfyUI compiles a model through a classic (non-dynamic) copy of its patcher, which it rebuilds from
the loader's cached_patcher_init; this loads our model that way, takes one Linear per quant type and
compiles it whole (fullgraph=True fails on any graph break), comparing with the eager result.
"""

import torch

import comfy.model_management as mm
import folder_paths
from script_helpers import loaded_module


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    path = folder_paths.get_full_path_or_raise("diffusion_models", cfg["gguf"])
    patcher = pkg.nodes.integration.diffusion.load_gguf_unet(path, pkg.nodes.integration.diffusion.ON_THE_FLY, disable_dynamic=True)
    mm.load_models_gpu([patcher])
    device, dtype = mm.get_torch_device(), patcher.model.get_dtype_inference()
    results = {}

    def check(key, module, name):
        x = torch.randn(5, module.in_features, device=device, dtype=dtype)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(module)(x)
        compiled = torch.compile(module, backend=cfg["backend"], fullgraph=True)
        with torch.no_grad():
            got, ref = compiled(x), module(x)
        results[key] = {
            "graphs": explained.graph_count, "breaks": explained.graph_break_count, "layer": name,
            "reasons": [str(b.reason)[:300] + " @ " + "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                                           for f in b.user_stack[-3:])
                        for b in explained.break_reasons],
            "max_diff": (got.float() - ref.float()).abs().max().item(), "scale": ref.float().abs().max().item()}

    for name, module in patcher.model.named_modules():
        if not isinstance(module, pkg.nodes.integration.ops.GGUFOps.Linear) or not module.quantized():
            continue
        if module.plan.fmt.name not in results:
            check(module.plan.fmt.name, module, name)
    # An fp8-compute layer (FP8 rows), built directly: the loader makes them only on fp8 GPUs. On the
    # CPU it runs the dequantized weight, on such a GPU the fp8 matmul; either must trace whole.
    fp8 = pkg.loaders.quant.fp8
    layer = pkg.nodes.integration.ops.GGUFOps.Linear(256, 128)
    raw = fp8.FP8Rows.encode(torch.randn(128, 256, generator=torch.Generator().manual_seed(0)))
    layer.load_state_dict({"weight": pkg.loaders.quant.weight.wrap(raw, fp8.FP8Rows, (128, 256)),
                           "bias": torch.zeros(128, dtype=dtype)})
    layer.to(device)
    check("FP8_ROWS", layer, "fp8 rows (built)")
    return results
