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
    count = pkg.nodes.integration.ops.cached_factor_count
    mm.load_models_gpu([lora_ours])
    with torch.no_grad():
        lora_ours.model.apply_model(x, sigma, c_crossattn=context)
    result["factors_while_loaded"] = count(lora_ours.model)
    mm.unload_all_models()
    result["factors_after_unload"] = count(lora_ours.model)
    result["lora"] = rel(forward(lora_ours), ref)
    result["lora_again"] = rel(forward(lora_ours), ref)
    result["after_lora"] = rel(forward(ours), base)
    quantized_layers = pkg.nodes.integration.ops.quantized_layers
    result["quantized_params"] = quantized_layers(ours.model)
    copies_of = pkg.nodes.integration.compat.COPIES
    plan_mod = pkg.loaders.quant.plan

    def held(patcher, kind):
        return sum(isinstance(p.copy, kind) for p in getattr(patcher.model, copies_of).holders)

    # auto on a GPU with room: every layer converts its bytes at its first run and keeps the copy.
    cached = pkg.nodes.integration.diffusion.load_gguf_unet(dm.path, "auto")
    mm.load_models_gpu([cached])
    with torch.no_grad():
        first = cached.model.apply_model(x, sigma, c_crossattn=context).float().cpu()
        again = cached.model.apply_model(x, sigma, c_crossattn=context).float().cpu()
    result["auto_cached"] = rel(first, base)
    result["auto_cached_copies"] = held(cached, plan_mod.Copy)
    result["auto_cached_again"] = rel(again, base)
    mm.unload_all_models()
    result["auto_cached_copies_after_unload"] = len(getattr(cached.model, copies_of).holders)
    # The fp8 mode with room: FP8-rows copies made on the GPU at first use; output within fp8 rounding.
    fp8_model = pkg.nodes.integration.diffusion.load_gguf_unet(dm.path, "fp8 compute")
    layers = [m for m in fp8_model.model.modules() if isinstance(m, pkg.nodes.integration.ops.FileWeights)
              and m.plan is not None]
    result["fp8_shared_groups"] = len({id(m.plan.shared) for m in layers if m.plan.shared is not None})
    result["blocks"] = len(fp8_model.model.diffusion_model.transformer_blocks)
    mm.load_models_gpu([fp8_model])
    with torch.no_grad():
        shared = [fp8_model.model.apply_model(x, sigma, c_crossattn=context).float().cpu() for _ in range(2)]
    result["fp8"] = rel(shared[0], base)
    result["fp8_layers"] = held(fp8_model, plan_mod.FP8Copy)
    mm.unload_all_models()
    result["fp8_copies_after_unload"] = len(getattr(fp8_model.model, copies_of).holders)
    result["fp8_lora"] = rel(forward(comfy.sd.load_lora_for_models(fp8_model, None, lora, 1.0, 0.0)[0]), ref)
    # The q, k and v projections of each stream share one activation quantization. It changes no bit.
    for m in layers:
        m.plan.shared = None
    result["fp8_shared_equals_unshared"] = torch.equal(shared[0], forward(fp8_model))
    # fp8 on the fly: the same fp8 arithmetic from the GGUF bytes, decoded per call; no copies, the rows'
    # scales kept on the GPU while the model is loaded.
    stream = pkg.nodes.integration.diffusion.load_gguf_unet(dm.path, "fp8 on the fly")
    streamed = [m for m in stream.model.modules() if isinstance(getattr(m, "plan", None), plan_mod.FP8StreamPlan)]
    result["fp8_stream_layers"] = len(streamed)
    result["fp8_stream_groups"] = len({id(m.plan.shared) for m in streamed if m.plan.shared is not None})
    mm.load_models_gpu([stream])
    with torch.no_grad():
        streamed_out = stream.model.apply_model(x, sigma, c_crossattn=context).float().cpu()
    result["fp8_stream"] = rel(streamed_out, base)
    result["fp8_stream_vs_fp8"] = rel(streamed_out, shared[0])
    result["fp8_stream_scales_while_loaded"] = sum(m.plan.scales is not None for m in streamed)
    result["fp8_stream_copies"] = getattr(stream.model, copies_of, None) is not None
    mm.unload_all_models()
    result["fp8_stream_scales_after_unload"] = sum(m.plan.scales is not None for m in streamed)
    result["fp8_stream_lora"] = rel(forward(comfy.sd.load_lora_for_models(stream, None, lora, 1.0, 0.0)[0]), ref)
    # Where the copies would not fit next to the file's bytes, the fp8 mode requantizes at load: ComfyUI
    # then holds FP8 rows, and the dynamic loader's resident ones keep their operands while loaded.
    real_free = mm.get_free_memory
    mm.get_free_memory = lambda *a, **k: 1 << 30
    try:
        at_load = pkg.nodes.integration.diffusion.load_gguf_unet(dm.path, "fp8 compute")
    finally:
        mm.get_free_memory = real_free
    fp8_plans = [m.plan for m in at_load.model.modules() if isinstance(getattr(m, "plan", None), plan_mod.FP8Plan)]
    result["fp8_at_load_layers"] = len(fp8_plans)
    mm.load_models_gpu([at_load])
    with torch.no_grad():
        kept = [at_load.model.apply_model(x, sigma, c_crossattn=context).float().cpu() for _ in range(2)]
    result["fp8_at_load"] = rel(kept[0], base)
    result["fp8_kept_while_loaded"] = sum(p.kept is not None for p in fp8_plans)
    mm.unload_all_models()
    result["fp8_kept_after_unload"] = sum(p.kept is not None for p in fp8_plans)
    result["fp8_kept_equals_fresh"] = torch.equal(kept[0], kept[1])
    result["finite"] = bool(torch.isfinite(base).all())
    return result
