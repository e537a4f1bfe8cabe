"""Runs inside a started ComfyUI (see comfy_runner.py): our MODEL through ComfyUI's model management.

Compares one denoising forward of the GGUF model with ComfyUI's own model on the twin weights:
fully loaded, with a LoRA merged at load, with the LoRA applied per layer in a partial (lowvram)
load (in low-rank form, and a full-difference patch through ComfyUI's math), after unpatching, on
a clone, and in cached mode; and reports the memory ComfyUI accounts for the model.
"""

import logging

import torch

import comfy.model_management as mm
import comfy.lora
import comfy.sd
import comfy.utils
from script_helpers import loaded_module, ours_and_native


def run(cfg):
    ours, native, lora, dm = ours_and_native(cfg)
    pkg = loaded_module(cfg, cfg["package"])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)  # Wan-style latents carry a time axis
    context = torch.randn(1, 8, 256, generator=g)
    sigma = torch.tensor([0.7])
    device = mm.get_torch_device()

    def forward(patcher, **load):
        # Clones share one model: each run loads its patcher's weights and puts the originals back after.
        patcher.load(device, **load)
        with torch.no_grad():
            out = patcher.model.apply_model(x, sigma, c_crossattn=context)
        if load.get("full_load"):
            patcher.unpatch_model(device)
        return out

    def count_calls(module, name):
        """Counts calls of module.name(patches, weight, key, ...) on quantized weights until .pop(),
        which restores it and returns the count. (Float layers keep ComfyUI's own patching.)"""
        original, counter = getattr(module, name), [0]
        quantized = {k for k, v in ours.model.state_dict().items() if v.dtype == torch.uint8}

        def counted(patches, weight, key, *args, **kwargs):
            counter[0] += key in quantized
            return original(patches, weight, key, *args, **kwargs)

        setattr(module, name, counted)
        return type("Count", (), {"pop": lambda self: (setattr(module, name, original), counter[0])[1]})()

    def diff(a, b):
        return (a - b).abs().max().item()

    def with_difference(ours_patcher, suffix, scale):
        """Clones of native and of ``ours_patcher`` with one random full-difference patch of the
        tensor whose key ends in ``suffix``."""
        key = next(k for k in ours_patcher.get_key_patches() if k.endswith(suffix))
        delta = torch.randn(comfy.utils.get_attr(native.model, key).shape, generator=g) * scale
        pair = native.clone(), ours_patcher.clone()
        for patcher in pair:
            patcher.add_patches({key: (delta,)}, 1.0)
        return pair

    def n_quantized(patcher):
        return pkg.nodes.integration.ops.quantized_layers(patcher.model)

    result = {}
    base_native = forward(native, full_load=True)
    base_ours = forward(ours, full_load=True)
    result["base"] = diff(base_ours, base_native)
    result["quantized_params"] = n_quantized(ours)

    lora_native, _ = comfy.sd.load_lora_for_models(native, None, lora, 1.0, 0.0)
    lora_ours, _ = comfy.sd.load_lora_for_models(ours, None, lora, 1.0, 0.0)
    ref = forward(lora_native, full_load=True)
    result["lora_effect"] = diff(ref, base_native)
    lora_ours.load(device, full_load=True)
    result["quantized_params_lora_merged"] = n_quantized(lora_ours)
    lora_ours.unpatch_model(device)
    result["lora_full"] = diff(forward(lora_ours, full_load=True), ref)
    result["quantized_params_after_unpatch"] = n_quantized(lora_ours)
    result["after_unpatch"] = diff(forward(ours, full_load=True), base_native)

    # A budget of one byte: every Linear runs through the cast path with its LoRA per layer, in
    # low-rank form: ComfyUI's from-scratch patch math (calculate_weight) must not run, on any forward.
    calls = count_calls(comfy.lora, "calculate_weight")
    partial = forward(lora_ours, lowvram_model_memory=1)
    partial_again = lora_ours.model.apply_model(x, sigma, c_crossattn=context)
    result["lora_partial"] = diff(partial, ref)
    result["lora_partial_again"] = diff(partial_again, ref)
    result["lora_partial_full_patch_calls"] = calls.pop()
    result["quantized_params_partial"] = n_quantized(lora_ours)
    result["factors_while_loaded"] = pkg.nodes.integration.ops.cached_factor_count(lora_ours.model)
    lora_ours.partially_unload(mm.unet_offload_device(), memory_to_free=1 << 40)
    lora_ours.detach()
    result["factors_after_detach"] = pkg.nodes.integration.ops.cached_factor_count(lora_ours.model)

    # A LoRA whose matrices do not fit its weight: ComfyUI logs an error and skips it; so do we.
    bad = dict(lora)
    up_key = next(k for k in bad if k.endswith("img_mlp.net.2.lora_up.weight"))
    bad[up_key] = torch.cat([bad[up_key], bad[up_key][:8]])
    bad_native = forward(comfy.sd.load_lora_for_models(native, None, bad, 1.0, 0.0)[0], full_load=True)
    bad_ours = comfy.sd.load_lora_for_models(ours, None, bad, 1.0, 0.0)[0]
    result["bad_lora_partial"] = diff(forward(bad_ours, lowvram_model_memory=1), bad_native)
    bad_ours.partially_unload(mm.unet_offload_device(), memory_to_free=1 << 40)
    bad_ours.detach()

    # A patch kind with no low-rank form (a full weight difference) goes through ComfyUI's own math.
    diff_native, diff_ours = with_difference(ours, "img_mlp.net.0.proj.weight", 0.05)
    diff_ref = forward(diff_native, full_load=True)
    calls = count_calls(comfy.lora, "calculate_weight")
    result["diff_patch_partial"] = diff(forward(diff_ours, lowvram_model_memory=1), diff_ref)
    result["diff_patch_effect"] = diff(diff_ref, base_native)
    result["diff_patch_full_patch_calls"] = calls.pop()
    diff_ours.partially_unload(mm.unet_offload_device(), memory_to_free=1 << 40)
    diff_ours.detach()

    clone = ours.clone()
    result["clone"] = diff(forward(clone, full_load=True), base_native)
    result["model_size"] = ours.model_size()
    result["native_size"] = native.model_size()
    # The file's bytes, its small float tensors counted in the dtype the model holds them in (its own).
    held = ours.model.get_dtype().itemsize
    result["file_tensor_bytes"] = sum(t.numel() * (held if type(t) is torch.Tensor and t.is_floating_point()
                                                    and t.numel() <= pkg.nodes.integration.diffusion.SMALL_TENSOR
                                                    else t.element_size()) for t in dm.state_dict.values())

    try:
        pkg.nodes.integration.diffusion.load_gguf_unet(dm.path, "fastest")
    except Exception as e:  # noqa: BLE001  (the test checks its type and message)
        result["bad_mode_error"] = f"{type(e).__name__}: {e}"
    cached = pkg.nodes.integration.diffusion.load_gguf_unet(dm.path, "cached")
    copies = getattr(cached.model, pkg.nodes.integration.compat.COPIES)
    result["cached_copies_before"] = len(copies.holders)
    result["cached"] = diff(forward(cached, full_load=True), base_native)
    result["cached_copies"] = len(copies.holders)
    result["cached_again"] = diff(cached.model.apply_model(x, sigma, c_crossattn=context), base_native)
    # A patch of a bias alone, which ComfyUI's classic loader merges into the layer's own bias: the
    # layer's copy (made from the old bias) must not run, and runs again once unpatched.
    bias_native, bias_ours = with_difference(cached, "img_mlp.net.0.proj.bias", 0.5)
    bias_ref = forward(bias_native, full_load=True)
    result["cached_bias_patch_effect"] = diff(bias_ref, base_native)
    result["cached_bias_patch"] = diff(forward(bias_ours, full_load=True), bias_ref)
    result["cached_after_bias_patch"] = diff(forward(cached, full_load=True), base_native)
    result["cached_quantized_params"] = n_quantized(cached)
    result["cached_model_size"] = cached.model_size()
    # ComfyUI asking the model for more memory than its bytes frees the copies; unloading frees them too.
    # Each time copies go, one log line says how many and why (what a user timing images looks for).
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    ops_log = logging.getLogger(pkg.nodes.integration.ops.__name__)
    ops_log.addHandler(handler)
    level = ops_log.level
    ops_log.setLevel(logging.INFO)  # ComfyUI's default (this runner configures no logging)
    try:
        cached.partially_unload(mm.unet_offload_device(), memory_to_free=1 << 40)
        result["cached_copies_after_free"] = len(copies.holders)
        forward(cached, full_load=True)
        cached.detach()
        result["cached_copies_after_detach"] = len(copies.holders)
        cached.detach()  # nothing left to free: nothing said
    finally:
        ops_log.removeHandler(handler)
        ops_log.setLevel(level)
    result["copies_freed_said"] = said
    return result
