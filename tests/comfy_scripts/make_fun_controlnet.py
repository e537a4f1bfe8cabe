"""Runs inside ComfyUI: a tiny random Qwen-Image "Fun" ControlNet (the 2512 ControlNet ComfyUI loads
with its ControlNetLoader) with the real tensor names, from ComfyUI's own class at a small width."""

import torch
from safetensors.torch import save_file

import comfy.ldm.qwen_image.controlnet
import comfy.ops


def run(cfg):
    model = comfy.ldm.qwen_image.controlnet.QwenImageFunControlNetModel(
        control_in_features=132, inner_dim=cfg["heads"] * cfg["head_dim"], num_attention_heads=cfg["heads"],
        attention_head_dim=cfg["head_dim"], operations=comfy.ops.manual_cast, dtype=torch.float32)
    g = torch.Generator().manual_seed(cfg["seed"])
    sd = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        sd[key] = 1.0 + 0.1 * noise if "norm" in key else noise / value.shape[-1] ** 0.5
    save_file(sd, cfg["out"])
    return {"tensors": len(sd)}
