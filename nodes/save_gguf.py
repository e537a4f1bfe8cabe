"""The node saving a MODEL (its LoRAs merged) as a GGUF file in diffusion_models."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..loaders.convert.recipes import LEVELS
from ..loaders.convert.to_gguf import convert
from .integration.export import model_checkpoint
from .integration.folders import IMATRIX, output_folder

NO_MATRIX = "none"


class SaveGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFSave",
            display_name="Save model as GGUF (Qwen-Image / Z-Image)",
            category="advanced/model_merging/qwen-image gguf",
            description="Saves a Qwen-Image or Z-Image MODEL, with the LoRAs and other patches applied to it "
                        "merged, as a GGUF file in models/diffusion_models, in the type mix of the GGUF files "
                        "people download (city96's). Its bytes are llama.cpp's for every type. Reload the model "
                        "list (R) to see the new file in the GGUF loader.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("type", options=list(LEVELS), default="Q4_K_M",
                               tooltip="Q4_K_M and Q5_K_M: what most people run (13 and 15 GB for Qwen-Image). "
                                       "_M mixes raise the value and MLP output projections and the first and last "
                                       "blocks; Q8_0 is nearly lossless; BF16 / F16 are not quantized."),
                io.String.Input("filename", default="qwen-image-custom",
                                tooltip="The file's name in models/diffusion_models; -TYPE.gguf is added."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name. Off: an existing file stops the save."),
                io.Combo.Input("importance_matrix", options=[NO_MATRIX, *folder_paths.get_filename_list(IMATRIX)],
                               default=NO_MATRIX, optional=True,
                               tooltip="An importance matrix from models/imatrix ('Collect Importance Matrix "
                                       "(GGUF)' makes one): the quantizers favour the weights that meet large "
                                       "activations, in the same types and sizes."),
            ],
            outputs=[io.String.Output(display_name="file")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, type: str, filename: str, overwrite: bool = False,
                importance_matrix: str = NO_MATRIX) -> io.NodeOutput:
        output = output_path(filename, type)
        imatrix = None if importance_matrix == NO_MATRIX else folder_paths.get_full_path_or_raise(IMATRIX,
                                                                                                   importance_matrix)
        bar = comfy.utils.ProgressBar(1000)
        ckpt = model_checkpoint(model, "the MODEL input")
        convert(ckpt, output, type, overwrite, lambda done, total, _: bar.update_absolute(done * 1000 // max(total, 1)),
                imatrix=imatrix)
        return io.NodeOutput(os.path.basename(output), ui={"text": [os.path.basename(output)]})


def output_path(filename: str, level: str) -> str:
    name = os.path.basename(filename.strip()).removesuffix(".gguf")
    if not name:
        raise ValueError("the file name is empty")
    return os.path.join(output_folder(), f"{name}-{level}.gguf")

