"""Runs inside a started ComfyUI (see comfy_runner.py): our MODEL through ComfyUI's model management.

Compares one denoising forward of the GGUF model with ComfyUI's own model on the twin weights:
fully loaded, with a LoRA merged at load, with the LoRA applied per layer in a partial (lowvram)
load, after unpatching, and on a clone; and reports the memory ComfyUI accounts for the model.
"""

import torch

import comfy.model_management as mm
import comfy.sd
from script_helpers import ours_and_native


def run(cfg):
    ours, native, lora, dm = ours_and_native(cfg)

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

    def diff(a, b):
        return (a - b).abs().max().item()

    def n_quantized(patcher):
        return sum(type(p).__name__ == "GGMLTensor" for p in patcher.model.parameters())

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

    # A budget of one byte: every Linear runs through the cast path with its LoRA per layer.
    partial = forward(lora_ours, lowvram_model_memory=1)
    result["lora_partial"] = diff(partial, ref)
    result["quantized_params_partial"] = n_quantized(lora_ours)
    lora_ours.partially_unload(mm.unet_offload_device(), memory_to_free=1 << 40)
    lora_ours.detach()

    clone = ours.clone()
    result["clone"] = diff(forward(clone, full_load=True), base_native)
    result["model_size"] = ours.model_size()
    result["native_size"] = native.model_size()
    result["file_tensor_bytes"] = sum(t.numel() * t.element_size() for t in dm.state_dict.values())
    return result
