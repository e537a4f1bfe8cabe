"""ComfyUI-QwenImage-GGUF: run Qwen-Image and Z-Image from quantized GGUF files in ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from .nodes import folders
from .nodes.clip_loader import ClipLoaderGGUF
from .nodes.unet_loader import UnetLoaderGGUF


class QwenImageGGUFExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [UnetLoaderGGUF, ClipLoaderGGUF]


async def comfy_entrypoint() -> QwenImageGGUFExtension:
    folders.register()
    return QwenImageGGUFExtension()
