"""Runs inside a started ComfyUI on an NVIDIA GPU (see comfy_runner.py): our MODEL under ComfyUI's
dynamic VRAM loader, against ComfyUI's own model on the twin weights, with and without a LoRA, and in
the auto mode (which on a GPU with room to spare holds every weight dequantized), and the fp8 mode."""

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfy.sd
from script_helpers import loaded_module, ours_and_native


def run(cfg):
    ours, native, lora, dm = ours_and_native(cfg)
    pkg = loaded_module(cfg, cfg["package"])
    device = mm.get_torch_device()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 16, 16, generator=g).to(device)
    context = torch.randn(1, 12, 256, generator=g).to(device)
    sigma = torch.tensor([0.7], device=device)

    def forward(patcher):
        mm.load_models_gpu([patcher])
        with torch.no_grad():
            out = patcher.model.apply_model(x, sigma, c_crossattn=context).float().cpu()
        mm.unload_all_models()
        return out

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    result = {"aimdo_enabled": comfy.memory_management.aimdo_enabled, "patcher": type(ours).__name__,
              "dtype": str(ours.model.get_dtype())}
    base = forward(native)
    result["base"] = rel(forward(ours), base)
    ref = forward(comfy.sd.load_lora_for_models(native, None, lora, 1.0, 0.0)[0])
    result["lora_effect"] = rel(ref, base)
    lora_ours = comfy.sd.load_lora_for_models(ours, None, lora, 1.0, 0.0)[0]
    count = pkg.nodes.lora.cached_factor_count
    mm.load_models_gpu([lora_ours])
    with torch.no_grad():
        lora_ours.model.apply_model(x, sigma, c_crossattn=context)
    result["factors_while_loaded"] = count(lora_ours.model)
    mm.unload_all_models()
    result["factors_after_unload"] = count(lora_ours.model)
    result["lora"] = rel(forward(lora_ours), ref)
    result["lora_again"] = rel(forward(lora_ours), ref)
    result["after_lora"] = rel(forward(ours), base)
    quantized_layers = pkg.nodes.ops.quantized_layers
    result["quantized_params"] = quantized_layers(ours.model)
    cached = pkg.nodes.model.load_gguf_unet(dm.path, "auto")
    result["auto_cached"] = rel(forward(cached), base)
    result["auto_cached_quantized_params"] = quantized_layers(cached.model)
    # The fp8 mode: every eligible Linear weight requantized to FP8 rows; output within fp8 rounding.
    fp8_model = pkg.nodes.model.load_gguf_unet(dm.path, "fp8 compute")
    result["fp8"] = rel(forward(fp8_model), base)
    result["fp8_layers"] = sum(getattr(m, "weight_qtype", None) is pkg.loaders.fp8.FP8_ROWS
                               for m in fp8_model.model.modules())
    result["fp8_lora"] = rel(forward(comfy.sd.load_lora_for_models(fp8_model, None, lora, 1.0, 0.0)[0]), ref)
    # The q, k and v projections of each stream share one activation quantization, and the dynamic
    # loader's resident fp8 weights keep their operands only while the model is loaded. Neither may
    # change a bit of the result.
    layers = [m for m in fp8_model.model.modules() if isinstance(m, pkg.nodes.ops.GGUFOps.Linear)]
    result["fp8_shared_groups"] = len({id(m.shared_input) for m in layers if m.shared_input is not None})
    result["blocks"] = len(fp8_model.model.diffusion_model.transformer_blocks)
    kept = pkg.nodes.ops._KEPT_FP8
    mm.load_models_gpu([fp8_model])
    with torch.no_grad():
        shared = [fp8_model.model.apply_model(x, sigma, c_crossattn=context).float().cpu() for _ in range(2)]
    result["fp8_kept_while_loaded"] = sum(kept in m.__dict__ for m in layers)
    mm.unload_all_models()
    result["fp8_kept_after_unload"] = sum(kept in m.__dict__ for m in layers)
    for m in layers:
        m.shared_input = None
    result["fp8_shared_equals_unshared"] = torch.equal(shared[0], forward(fp8_model))
    result["fp8_kept_equals_fresh"] = torch.equal(shared[0], shared[1])
    result["finite"] = bool(torch.isfinite(base).all())
    return result
