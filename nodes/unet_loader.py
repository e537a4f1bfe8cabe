"""The diffusion-model loader node: a GGUF file in, ComfyUI's MODEL out."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..loaders.gguf.file_kind import UNET_LOADER
from .integration.diffusion import AUTO, CACHED, FP8_COMPUTE, FP8_ON_THE_FLY, MODES, ON_THE_FLY, load_gguf_unet
from .integration.model_files import full_path, validate

FOLDER = "diffusion_models_gguf"


class UnetLoaderGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFUnetLoader",
            display_name=UNET_LOADER,
            category="loaders/qwen-image gguf",
            description="Loads a GGUF diffusion model (Qwen-Image, -2512, -Edit/-2509/-2511, Z-Image-Turbo) "
                        "as a MODEL that every core node accepts. Weights stay quantized in memory and are "
                        "dequantized layer by layer in bf16 (fp32 where bf16 is unsupported), never fp16.",
            inputs=[
                io.Combo.Input(
                    "unet_name",
                    options=folder_paths.get_filename_list(FOLDER),
                    tooltip="A .gguf diffusion model from models/diffusion_models or models/unet, e.g. "
                            "qwen-image-2512-Q4_K_M.gguf. Its size and variant are read from the file. A "
                            "preset's file that is not installed is replaced by another installed quant of "
                            "the same model (logged).",
                ),
                io.Combo.Input(
                    "mode", options=MODES, default=AUTO, optional=True,
                    tooltip=f"{ON_THE_FLY}: least VRAM, weights stay quantized and each layer is dequantized "
                            f"when it runs. {CACHED}: loads as fast; each layer keeps a dequantized (bf16) copy on "
                            f"the GPU from its first run while free VRAM allows (native speed), the rest on the "
                            f"fly. {FP8_COMPUTE}: weights held as fp8 with per-row scales and run with fp8 matmuls, on GPUs with fp8 "
                            f"tensor cores (RTX 40xx, H100 and later): about 1 byte per weight, faster than bf16 "
                            f"at large sizes, results a few percent from bf16. {FP8_ON_THE_FLY}: the same fp8 "
                            f"matmuls with the weights kept quantized, at {ON_THE_FLY}'s VRAM (layers with few rows "
                            f"of input, the modulation, in bf16). "
                            f"{AUTO}: {CACHED} on a GPU, {ON_THE_FLY} on the CPU. The log says what was chosen.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, unet_name: str) -> bool | str:
        # Taking unet_name here replaces ComfyUI's "value not in list" check with one that accepts
        # another installed quant of a preset's model.
        return validate(FOLDER, unet_name)

    @classmethod
    def execute(cls, unet_name: str, mode: str = AUTO) -> io.NodeOutput:
        return io.NodeOutput(load_gguf_unet(full_path(FOLDER, unet_name), mode))
