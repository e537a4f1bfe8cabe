"""Model-folder keys for .gguf files.

``.gguf`` is not one of ComfyUI's model extensions; registering keys of our own that share the core
keys' path lists (so extra_model_paths.yaml entries apply) avoids changing the extension set every
other loader sees.
"""

from __future__ import annotations

import folder_paths

GGUF_FOLDERS = {"diffusion_models_gguf": "diffusion_models", "text_encoders_gguf": "text_encoders"}


def register() -> None:
    for key, core in GGUF_FOLDERS.items():
        paths = folder_paths.folder_names_and_paths[core][0]
        folder_paths.folder_names_and_paths[key] = (paths, {".gguf"})
