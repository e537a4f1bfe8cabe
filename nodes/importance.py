"""The nodes collecting an importance matrix while a MODEL samples and saving it for the GGUF saver
(and ``python -m loaders.convert --imatrix``)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..loaders.convert.imatrix import ImportanceCollector
from .integration.folders import IMATRIX
from .integration.importance import collecting

Importance = io.Custom("QWEN_GGUF_IMPORTANCE")
CATEGORY = "advanced/model_merging/qwen-image gguf"


class CollectImportance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFCollectImportance",
            display_name="Collect Importance Matrix (GGUF)",
            category=CATEGORY,
            description="Sample with the MODEL this outputs (any sampler, a few prompts) and every Linear layer's "
                        "input activations are summed into an importance matrix. Save it with 'Save Importance "
                        "Matrix (GGUF)' and pick it in 'Save model as GGUF': the quantizers then favour the "
                        "weights that meet large activations (llama.cpp's --imatrix). Each save adds to the file "
                        "of its name, so prompts queued one after another gather in one file.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output(display_name="model"), Importance.Output(display_name="importance")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        collector = ImportanceCollector()
        return io.NodeOutput(collecting(model, collector), collector)


class SaveImportance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFSaveImportance",
            display_name="Save Importance Matrix (GGUF)",
            category=CATEGORY,
            description="Saves what 'Collect Importance Matrix (GGUF)' gathered into models/imatrix/NAME.imatrix.gguf "
                        "(llama.cpp's format), added to what the file already holds: queue prompts one after "
                        "another, across restarts too, and the file gathers them all. Connect the sampler's "
                        "LATENT so it saves after sampling.",
            inputs=[
                Importance.Input("importance"),
                io.Latent.Input("samples", tooltip="The sampler's output: the matrix is saved once it has run."),
                io.String.Input("filename", default="qwen-image",
                                tooltip="The file's name in models/imatrix; .imatrix.gguf is added."),
                io.Boolean.Input("replace", default=False,
                                 tooltip="Start the file afresh from this collection instead of adding to what it "
                                         "holds (needed when it holds another model's matrix)."),
            ],
            outputs=[io.String.Output(display_name="file")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, importance: ImportanceCollector, samples, filename: str, replace: bool = False) -> io.NodeOutput:
        name = os.path.basename(filename.strip()).removesuffix(".gguf").removesuffix(".imatrix")
        if not name:
            raise ValueError("the file name is empty")
        folder = folder_paths.get_folder_paths(IMATRIX)[0]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.imatrix.gguf")
        saved = importance.save(path, "ComfyUI prompts", replace)
        text = f"{os.path.basename(path)}: {len(saved.sums)} weights, {saved.calls} model calls in all"
        return io.NodeOutput(os.path.basename(path), ui={"text": [text]})
