"""Building ComfyUI's own model objects from a GGUF diffusion model read by ``loaders``."""

from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from ..loaders.diffusion import DiffusionModel
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


def build_model_patcher(dm: DiffusionModel) -> comfy.model_patcher.ModelPatcher:
    model_config = MODEL_CONFIGS[dm.family](dict(dm.unet_config))
    params = sum(logical_shape(t).numel() for t in dm.state_dict.values())
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype = comfy.model_management.unet_dtype(load_device, model_params=params, supported_dtypes=COMPUTE_DTYPES)
    model_config.set_inference_dtype(dtype, None)
    model_config.custom_operations = GGUFOps
    model = model_config.get_model(dm.state_dict, "", device=offload_device)
    model.load_model_weights(dict(dm.state_dict), "")
    for module in model.modules():
        if isinstance(module, GGUFOps.Linear):
            module.compute_dtype = dtype
    log.info("GGUF %s: %s (%s naming), %d layers, computing in %s; weights %s",
             dm.path, dm.variant, dm.naming, dm.unet_config.get("num_layers", dm.unet_config.get("n_layers")),
             dtype, dm.summary)
    # The plain patcher: ComfyUI's dynamic-VRAM patcher casts raw weights by dtype, which would turn
    # quantized bytes into numbers.
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
