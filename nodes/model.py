"""Building ComfyUI's own model objects from a GGUF diffusion model read by ``loaders``."""

from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from ..loaders.diffusion import DiffusionModel, open_diffusion_model
from ..loaders.tensor import logical_shape
from .ops import GGUFOps

log = logging.getLogger(__name__)

# Our family name -> ComfyUI's model config class (latent format, sampling defaults, conditioning).
MODEL_CONFIGS = {
    "qwen_image": comfy.supported_models.QwenImage,
    "z_image": comfy.supported_models.ZImage,
}

# Qwen-Image overflows in fp16 (black images), so fp16 is never offered whatever the device supports.
COMPUTE_DTYPES = [torch.bfloat16, torch.float32]


def load_gguf_unet(path: str, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    patcher = build_model_patcher(open_diffusion_model(path), disable_dynamic)
    # Lets ComfyUI rebuild a classic (non-dynamic) copy when a node asks for one (torch.compile does).
    patcher.cached_patcher_init = (load_gguf_unet, (path,))
    return patcher


def build_model_patcher(dm: DiffusionModel, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    model_config = MODEL_CONFIGS[dm.family](dict(dm.unet_config))
    params = sum(logical_shape(t).numel() for t in dm.state_dict.values())
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype = comfy.model_management.unet_dtype(load_device, model_params=params, supported_dtypes=COMPUTE_DTYPES)
    model_config.set_inference_dtype(dtype, None)
    model_config.custom_operations = GGUFOps
    model = model_config.get_model(dm.state_dict, "", device=offload_device)
    # ComfyUI's current patcher: with its dynamic VRAM loader on (NVIDIA, the default) the quantized
    # bytes live in its page cache and stream to the GPU as needed; otherwise the classic one.
    patcher_class = comfy.model_patcher.ModelPatcher if disable_dynamic else comfy.model_patcher.CoreModelPatcher
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    model.load_model_weights(dict(dm.state_dict), "", assign=patcher.is_dynamic())
    for module in model.modules():
        if isinstance(module, GGUFOps.Linear):
            module.compute_dtype = dtype
    log.info("GGUF %s: %s (%s naming), %d layers, computing in %s; weights %s",
             dm.path, dm.variant, dm.naming, dm.unet_config.get("num_layers", dm.unet_config.get("n_layers")),
             dtype, dm.summary)
    return patcher
