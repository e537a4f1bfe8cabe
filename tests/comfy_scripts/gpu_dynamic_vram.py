"""Runs inside a started ComfyUI on an NVIDIA GPU (see comfy_runner.py): our MODEL under ComfyUI's
dynamic VRAM loader, against ComfyUI's own model on the twin weights, with and without a LoRA."""

import json
import os
import sys

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths


def loaded_module(cfg, name):
    return sys.modules[os.path.join(cfg["custom_nodes"], name).replace(".", "_x_")]


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    test_nodes = loaded_module(cfg, "comfy_test_nodes")
    path = folder_paths.get_full_path_or_raise("diffusion_models", cfg["gguf"])
    ours = pkg.nodes.model.load_gguf_unet(path)
    config = pkg.loaders.diffusion.open_diffusion_model(path).unet_config
    native = test_nodes.TestNativeUnetLoader().load(cfg["twin"], "qwen_image", json.dumps(config))[0]
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", cfg["lora"]))
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
    result["lora"] = rel(forward(lora_ours), ref)
    result["lora_again"] = rel(forward(lora_ours), ref)
    result["after_lora"] = rel(forward(ours), base)
    result["quantized_params"] = sum(type(p).__name__ == "GGMLTensor" for p in ours.model.parameters())
    result["finite"] = bool(torch.isfinite(base).all())
    return result
