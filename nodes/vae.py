"""The VAE loader and the checked decode node."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .integration.model_files import validate
from .integration.vae import DEFAULT_TILE, check_pair, load_vae

FOLDER = "vae_gguf"


class VAELoaderGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFVAELoader",
            display_name="Load Qwen-Image / Z-Image VAE",
            category="loaders/qwen-image gguf",
            description="Loads the Qwen-Image VAE (qwen_image_vae.safetensors, or the same weights as GGUF) or "
                        "the Flux VAE for Z-Image. Its decodes and encodes tile by themselves when the image would "
                        "not fit in free memory, and NaN/inf results are redone in fp32 instead of saving a black "
                        "image.",
            inputs=[
                io.Combo.Input("vae_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="From models/vae: qwen_image_vae.safetensors (Qwen-Image, -Edit), "
                                       "ae.safetensors (Z-Image), or a .gguf of either."),
                io.Int.Input("tile_size", default=DEFAULT_TILE, min=128, max=4096, step=32, advanced=True,
                             tooltip="Tile size in pixels for decodes and encodes that would not fit in free "
                                     "memory. Lower it if a large image still runs out of memory."),
            ],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def validate_inputs(cls, vae_name: str) -> bool | str:
        # In place of ComfyUI's bare "value not in list": a missing file named with where to get it.
        return validate(FOLDER, vae_name, substitute=False)

    @classmethod
    def execute(cls, vae_name: str, tile_size: int = DEFAULT_TILE) -> io.NodeOutput:
        return io.NodeOutput(load_vae(folder_paths.get_full_path_or_raise(FOLDER, vae_name), tile_size))


class VAEDecodeChecked(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFVAEDecode",
            display_name="VAE Decode (checked)",
            category="latent/qwen-image gguf",
            description="VAEDecode that first checks the VAE belongs to the model's latents (connect the model), "
                        "tiles when the image would not fit in free memory, and never returns NaN as a black image.",
            inputs=[
                io.Latent.Input("samples"),
                io.Vae.Input("vae"),
                io.Model.Input("model", optional=True,
                               tooltip="The model that made the latent: lets the node refuse a VAE of another "
                                       "family (e.g. the Flux VAE on a Qwen-Image latent) before decoding."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae, model=None) -> io.NodeOutput:
        if model is not None:
            check_pair(vae, model)
        latent = samples["samples"]
        images = vae.decode(latent)
        if images.ndim == 5:  # video-capable VAEs return frames: a batch of images here
            images = images.reshape(-1, *images.shape[-3:])
        return io.NodeOutput(images)

