"""Model-folder keys for .gguf files.

``.gguf`` is not one of ComfyUI's model extensions; registering keys of our own that share the core
keys' path lists (so extra_model_paths.yaml entries apply) avoids changing the extension set every
other loader sees.
"""

from __future__ import annotations

import os

import folder_paths

from .compat import core_folders

# our key -> (the core key whose folders it shares, the extensions it lists)
GGUF_FOLDERS = {
    "diffusion_models_gguf": ("diffusion_models", {".gguf"}),
    "text_encoders_gguf": ("text_encoders", {".gguf"}),
    "vae_gguf": ("vae", {".gguf", ".safetensors", ".sft"}),
}


# Importance matrices (llama.cpp's imatrix .gguf files) live in a folder of their own: beside the
# diffusion models the GGUF loader would list them as models.
IMATRIX = "imatrix"


def register() -> None:
    for key, (core, extensions) in GGUF_FOLDERS.items():
        folder_paths.folder_names_and_paths[key] = (core_folders(core), extensions)
    if IMATRIX not in folder_paths.folder_names_and_paths:  # extra_model_paths.yaml may have added it
        folder_paths.folder_names_and_paths[IMATRIX] = ([os.path.join(folder_paths.models_dir, IMATRIX)], {".gguf"})
    else:
        folder_paths.folder_names_and_paths[IMATRIX][1].add(".gguf")


def listing_key(folder: str) -> str:
    """The folder key listing the files a preset may name in core folder ``folder``: ours where we
    have one (it lists .gguf files too), else the core key (LoRAs)."""
    key = f"{folder}_gguf"
    return key if key in GGUF_FOLDERS else folder


def output_folder() -> str:
    """Where saved diffusion models go: the first diffusion_models folder, except ComfyUI's legacy
    models/unet, which it lists first by default (files go to models/diffusion_models, as the saver
    says)."""
    folders = folder_paths.get_folder_paths("diffusion_models")
    legacy = os.path.join(folder_paths.models_dir, "unet")
    modern = os.path.join(folder_paths.models_dir, "diffusion_models")
    return modern if os.path.normpath(folders[0]) == os.path.normpath(legacy) and modern in folders else folders[0]
