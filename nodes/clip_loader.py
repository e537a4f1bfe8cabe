"""The text-encoder loader node: a language-model GGUF and its mmproj vision file in, CLIP out."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..loaders.gguf.file_kind import CLIP_LOADER
from ..loaders.models.text_encoder import open_text_encoder
from .integration.model_files import validate
from .integration.text_encoder import build_clip

NONE = "none"
FOLDER = "text_encoders_gguf"


class ClipLoaderGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = folder_paths.get_filename_list(FOLDER)
        return io.Schema(
            node_id="QwenImageGGUFClipLoader",
            display_name=CLIP_LOADER,
            category="loaders/qwen-image gguf",
            description="Loads a GGUF Qwen2.5-VL text encoder (Qwen-Image, -Edit) or Qwen3 (Z-Image) as a CLIP for "
                        "CLIPTextEncode and the Qwen-Image edit nodes. The mmproj file is chosen explicitly and "
                        "checked against the language model when loading.",
            inputs=[
                io.Combo.Input("clip_name", options=files,
                               tooltip="The language-model GGUF from models/text_encoders or models/clip, e.g. "
                                       "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf (Qwen-Image) or "
                                       "Qwen3-4B-Instruct-2507-Q4_K_M.gguf (Z-Image)."),
                io.Combo.Input("mmproj_name", options=[NONE] + files, default=NONE,
                               tooltip="The vision projector published with that language model, e.g. "
                                       "mmproj-F16.gguf. Needed by TextEncodeQwenImageEdit(Plus); 'none' is "
                                       "enough for text to image."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def validate_inputs(cls, clip_name: str, mmproj_name: str = NONE) -> bool | str:
        # In place of ComfyUI's bare "value not in list": each missing file named with where to get it.
        # ComfyUI shows the one message at both inputs, so each file's says which input it is.
        missing = [f"{key}: {reason}" for key, name in (("clip_name", clip_name), ("mmproj_name", mmproj_name))
                   if name != NONE and (reason := validate(FOLDER, name, substitute=False)) is not True]
        return "; ".join(missing) or True

    @classmethod
    def execute(cls, clip_name: str, mmproj_name: str = NONE) -> io.NodeOutput:
        llm = folder_paths.get_full_path_or_raise(FOLDER, clip_name)
        mmproj = None if mmproj_name == NONE else folder_paths.get_full_path_or_raise(FOLDER, mmproj_name)
        return io.NodeOutput(build_clip(open_text_encoder(llm, mmproj)))
