"""Test-only nodes, loaded by ComfyUI's custom-node loader beside the package under test.

They supply what the graphs under test need from outside (fixed conditioning, the native
reference model) and capture results (latents) to files the tests read back.
"""

import json

import torch
from safetensors.torch import save_file

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils
import folder_paths

MODEL_CONFIGS = {"qwen_image": comfy.supported_models.QwenImage, "z_image": comfy.supported_models.ZImage}


class TestConditioning:
    """Random text conditioning of a given width, reproducible from a seed."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                             "width": ("INT", {"default": 256})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {}]],)


class TestNativeUnetLoader:
    """The reference: a safetensors file loaded through ComfyUI's own model classes and ordinary
    ops, with the config passed explicitly (stock detection assumes the full-size widths)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "family": (list(MODEL_CONFIGS),), "config_json": ("STRING", {"default": "{}"})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name, family, config_json):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        config = MODEL_CONFIGS[family](json.loads(config_json))
        load_device = comfy.model_management.get_torch_device()
        dtype = comfy.model_management.unet_dtype(load_device, supported_dtypes=[torch.bfloat16, torch.float32])
        config.set_inference_dtype(dtype, None)
        config.custom_operations = comfy.ops.manual_cast
        model = config.get_model(sd, "")
        patcher = comfy.model_patcher.CoreModelPatcher(model, load_device, comfy.model_management.unet_offload_device())
        model.load_model_weights(sd, "", assign=patcher.is_dynamic())
        return (patcher,)


class TestSaveLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "path": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing"

    def save(self, samples, path):
        save_file({"samples": samples["samples"].contiguous()}, path)
        return {}


NODE_CLASS_MAPPINGS = {"TestConditioning": TestConditioning, "TestNativeUnetLoader": TestNativeUnetLoader,
                       "TestSaveLatent": TestSaveLatent}
