"""ComfyUI-QwenImage-GGUF: run Qwen-Image and Z-Image from quantized GGUF files in ComfyUI."""

from comfy_api.latest import ComfyExtension, io

from .nodes.integration import compat, folders, model_files
from .nodes.clip_loader import ClipLoaderGGUF
from .nodes.importance import CollectImportance, SaveImportance
from .nodes.nan_guard import NaNGuard
from .nodes.save_gguf import SaveGGUF
from .nodes.unet_loader import UnetLoaderGGUF
from .nodes.vae import VAEDecodeChecked, VAELoaderGGUF


WEB_DIRECTORY = "./web"


class QwenImageGGUFExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [UnetLoaderGGUF, ClipLoaderGGUF, VAELoaderGGUF, VAEDecodeChecked, NaNGuard, SaveGGUF, CollectImportance,
                SaveImportance]


async def comfy_entrypoint() -> QwenImageGGUFExtension:
    compat.check()
    folders.register()
    model_files.register_routes()
    model_files.provide_example_inputs()
    return QwenImageGGUFExtension()
