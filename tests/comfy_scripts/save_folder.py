"""Where the GGUF saver writes, under ComfyUI's default folder list and a user's own first folder."""

import os

import folder_paths
from script_helpers import loaded_module


def run(cfg):
    folders = loaded_module(cfg, cfg["package"]).nodes.integration.folders
    models = folder_paths.models_dir
    unet, modern = os.path.join(models, "unet"), os.path.join(models, "diffusion_models")
    extensions = folder_paths.folder_names_and_paths["diffusion_models"][1]
    folder_paths.folder_names_and_paths["diffusion_models"] = ([unet, modern], extensions)
    default = folders.output_folder()
    folder_paths.folder_names_and_paths["diffusion_models"] = (["/data/my-models", unet, modern], extensions)
    return {"default": default, "modern": modern, "user": folders.output_folder()}
