"""VAE files (safetensors or GGUF): which model family a VAE belongs to, and its weights as floats.

Qwen-Image decodes with the Wan-2.1-style 16-channel VAE (``qwen_image_vae.safetensors``), Z-Image
with the Flux VAE (``ae.safetensors``). A VAE of another family decodes a latent into garbage rather
than failing, so the family is told apart here, from the weights, and checked where it matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ..gguf.errors import GGUFError
from ..gguf.file_kind import classify
from ..gguf.reader import GGUFFile, require_regular_file
from ..gguf.state_dict import load_state_dict
from ..quant.weight import dequantize

PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class VAEFamily:
    name: str            # "wan21" or "flux"
    description: str
    latent_channels: int
    used_by: str         # the diffusion models whose latents it decodes
    file_hint: str


WAN21 = VAEFamily("wan21", "the Qwen-Image VAE (Wan 2.1 style, 16 channels)", 16, "Qwen-Image",
                  "qwen_image_vae.safetensors")
FLUX = VAEFamily("flux", "the Flux VAE (16 channels)", 16, "Z-Image", "ae.safetensors")
# The tensors a family's sizes are read from (as ComfyUI reads them), with their dimension count.
CONFIG_TENSORS = {
    "wan21": {"decoder.head.0.gamma": 4, "encoder.conv1.weight": 5, "decoder.head.2.weight": 5},
    "flux": {"decoder.conv_in.weight": 4},
}
# ComfyUI latent format class name -> the VAE family that decodes it.
LATENT_FORMATS = {"Wan21": WAN21, "Flux": FLUX}


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def identify(sd: dict[str, torch.Tensor], path: str) -> VAEFamily:
    if "decoder.middle.0.residual.0.gamma" in sd:
        conv1 = sd.get("decoder.conv1.weight")
        z = conv1.shape[1] if conv1 is not None and conv1.ndim >= 2 else None
        if z not in (None, 16):
            raise GGUFError(path, f"this is a Wan-style VAE with {z} latent channels (Wan 2.2?), not the "
                                  f"16-channel Qwen-Image VAE ({WAN21.file_hint})")
        return WAN21
    conv_in = sd.get("decoder.conv_in.weight")
    if conv_in is not None and conv_in.ndim == 4:
        channels = conv_in.shape[1]
        if channels == 16:
            return FLUX
        raise GGUFError(path, f"this is a VAE with {channels} latent channels (SD 1.x / SDXL?), which none of "
                              f"Qwen-Image ({WAN21.file_hint}) or Z-Image ({FLUX.file_hint}) uses")
    raise GGUFError(path, "not a VAE of a known kind: Qwen-Image needs qwen_image_vae.safetensors, "
                          "Z-Image the Flux VAE ae.safetensors")


def check_config(family: VAEFamily, sd: dict[str, torch.Tensor], path: str) -> None:
    """The tensors the family's sizes come from are present and shaped as such: otherwise ComfyUI
    fails with a bare KeyError or builds a model of the wrong size."""
    faults = [f"missing {k}" if k not in sd else f"{k} has {sd[k].ndim} dimensions, expected {ndim}"
              for k, ndim in CONFIG_TENSORS[family.name].items() if k not in sd or sd[k].ndim != ndim]
    faults += [f"{k} holds {v.dtype} values, not floats" for k, v in sd.items() if not v.is_floating_point()][:3]
    if faults:
        raise GGUFError(path, f"its tensors do not make {family.description}: {'; '.join(faults)}")


def open_vae(path: str) -> tuple[VAEFamily, dict[str, torch.Tensor]]:
    """The VAE's family and its weights as float tensors (GGUF quantized weights dequantized once:
    a VAE is small and runs in a handful of large convolutions)."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        gguf = GGUFFile(path)
        kind = classify(gguf)
        if kind.role in ("diffusion_model", "text_encoder", "mmproj"):
            raise GGUFError(path, f"this is {kind.description}, not a VAE")
        sd = {k: dequantize(v, torch.float32) if not v.is_floating_point() else v
              for k, v in load_state_dict(gguf, convert_dtype=torch.float32).items()}
    else:
        require_regular_file(path)  # GGUFFile checks its own
        try:
            sd = load_file(path)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise GGUFError(path, f"cannot be read as safetensors: {e}") from None
    sd = _strip(sd)
    family = identify(sd, path)
    check_config(family, sd, path)
    return family, sd
