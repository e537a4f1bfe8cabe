"""Shared by the scripts that comfy_runner.py runs inside a started ComfyUI."""

import json
import os
import sys

import folder_paths


def loaded_module(cfg, name):
    """A custom-node module as ComfyUI's loader registered it (under its path)."""
    return sys.modules[os.path.join(cfg["custom_nodes"], name).replace(".", "_x_")]


def ours_and_native(cfg):
    """Our MODEL from cfg["gguf"] (on the fly, whatever the free memory), ComfyUI's own model on
    cfg["twin"], the LoRA cfg["lora"], and the file as our library reads it."""
    pkg = loaded_module(cfg, cfg["package"])
    path = folder_paths.get_full_path_or_raise("diffusion_models", cfg["gguf"])
    dm = pkg.loaders.models.diffusion.open_diffusion_model(path)
    ours = pkg.nodes.integration.diffusion.load_gguf_unet(path, pkg.nodes.integration.diffusion.ON_THE_FLY)
    native = loaded_module(cfg, "comfy_test_nodes").TestNativeUnetLoader().load(
        cfg["twin"], dm.family, json.dumps(dm.unet_config))[0]
    import comfy.utils
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", cfg["lora"]))
    return ours, native, lora, dm
