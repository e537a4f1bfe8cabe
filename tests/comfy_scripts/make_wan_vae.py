"""Runs inside ComfyUI: a tiny random Qwen-Image (Wan 2.1 style) VAE with the real tensor names,
taken from ComfyUI's own class at a small width, saved as float32 safetensors."""

import torch
from safetensors.torch import save_file

import comfy.ldm.wan.vae


def run(cfg):
    model = comfy.ldm.wan.vae.WanVAE(dim=cfg["dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(cfg["seed"])
    sd = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        sd[key] = 1.0 + 0.1 * noise if key.endswith("gamma") else 0.1 * noise
        if ".proj." in key:
            # Attention sees the whole image, which tiles cannot: a trained decoder leans on it
            # little, a random one would not, and then no tiled decode could match an untiled one.
            sd[key] *= 0.01
    save_file(sd, cfg["out"])
    return {"tensors": len(sd)}
