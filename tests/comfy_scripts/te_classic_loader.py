"""Runs inside a started ComfyUI on an NVIDIA GPU with its classic (estimate-based) loader, as on GPUs
without the dynamic VRAM loader or with --disable-dynamic-vram, --highvram or --gpu-only (see
comfy_runner.py): our CLIP where ComfyUI puts a large text encoder on a roomy GPU from the start,
encoded twice. Reports where the quantized bytes are after the encodes and the conditionings against
ComfyUI's own encoder on the same weights."""

import torch

import comfy.memory_management
import comfy.model_management as mm
import folder_paths
from script_helpers import loaded_module


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    # ComfyUI's rule for a text encoder over 1 GB on a GPU with room for it (the fixture is smaller).
    mm.text_encoder_initial_device = lambda load_device, offload_device, model_size=0: load_device
    path = folder_paths.get_full_path_or_raise("text_encoders", cfg["gguf"])
    ours = pkg.nodes.integration.text_encoder.build_clip(pkg.loaders.models.text_encoder.open_text_encoder(path))
    native = loaded_module(cfg, "comfy_test_nodes").TestNativeClipLoader().load(**cfg["native"])[0]

    def encode(clip):
        return clip.encode_from_tokens_scheduled(clip.tokenize(cfg["prompt"]))[0][0].float().cpu()

    conds = [encode(ours) for _ in range(2)]
    layers = [m for m in ours.cond_stage_model.modules()
              if isinstance(m, pkg.nodes.integration.ops.FileWeights) and m.quantized()]
    on_gpu = sum(m.weight.device.type == "cuda" for m in layers)
    ref = encode(native)
    return {"aimdo_enabled": comfy.memory_management.aimdo_enabled, "patcher": type(ours.patcher).__name__,
            "quantized_layers": len(layers), "quantized_layers_on_gpu": on_gpu,
            "diffs": [((c - ref).norm() / ref.norm()).item() for c in conds],
            "finite": all(bool(torch.isfinite(c).all()) for c in conds)}
