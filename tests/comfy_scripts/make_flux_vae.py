"""Runs inside ComfyUI: a tiny random Flux-style VAE decoder with the real tensor names, from
ComfyUI's own class at a small width, saved as float32 safetensors (the text-to-image presets
only decode, so the encoder is left out)."""

import torch
from safetensors.torch import save_file

from comfy.ldm.modules.diffusionmodules.model import Decoder


def run(cfg):
    decoder = Decoder(ch=cfg["ch"], out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                      in_channels=3, resolution=256, z_channels=16, dropout=0.0)
    g = torch.Generator().manual_seed(cfg["seed"])
    sd = {}
    for key, value in decoder.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        sd["decoder." + key] = 1.0 + 0.1 * noise if key.endswith("norm.weight") or ".norm" in key and key.endswith("weight") and value.ndim == 1 else 0.1 * noise
    save_file(sd, cfg["out"])
    return {"tensors": len(sd)}
