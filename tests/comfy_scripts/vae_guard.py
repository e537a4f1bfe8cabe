"""Runs inside ComfyUI: our VAE's automatic tiling and its NaN recovery, against ComfyUI's plain VAE."""

import logging

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
from script_helpers import loaded_module


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(cfg):
    vae_nodes = loaded_module(cfg, cfg["package"]).nodes.integration.vae
    records = Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    latent = torch.randn(1, 16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    result = {}
    with torch.inference_mode():
        vae = vae_nodes.load_vae(cfg["vae"], tile_size=256)
        untiled = vae.decode(latent)
        free = comfy.model_management.get_free_memory
        comfy.model_management.get_free_memory = lambda *a, **k: 1024
        try:
            tiled = vae.decode(latent)
        finally:
            comfy.model_management.get_free_memory = free
        result["auto_tiled_logged"] = any("tiles" in m for m in records.messages)
        result["tiled_vs_untiled"] = (tiled - untiled).abs().mean().item()

        # fp16 overflow: one decoder weight made large enough to overflow fp16 but not fp32.
        sd = comfy.utils.load_torch_file(cfg["vae"])
        sd["decoder.conv1.weight"] = sd["decoder.conv1.weight"] * 3e4
        latent = latent[..., :16, :16]
        plain = comfy.sd.VAE(sd=dict(sd), dtype=torch.float16)
        result["plain_fp16_finite"] = bool(torch.isfinite(plain.decode(latent)).all())
        guarded = vae_nodes.GuardedVAE(sd=dict(sd), dtype=torch.float16)
        guarded.path = "overflow.safetensors"
        records.messages.clear()
        out = guarded.decode(latent)
        result["guarded_fp16_finite"] = bool(torch.isfinite(out).all())
        result["fp32_redo_logged"] = any("fp32" in m for m in records.messages)
        reference = comfy.sd.VAE(sd=dict(sd), dtype=torch.float32).decode(latent)
        result["guarded_vs_fp32"] = (out - reference).abs().max().item()

        sd["decoder.conv1.weight"][0] = float("nan")
        broken = vae_nodes.GuardedVAE(sd=dict(sd), dtype=torch.float16)
        broken.path = "broken.safetensors"
        try:
            broken.decode(latent)
            result["broken_error"] = None
        except Exception as e:
            result["broken_error"] = str(e)
    return result
