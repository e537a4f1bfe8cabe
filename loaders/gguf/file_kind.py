"""What a GGUF file holds, so a loader handed the wrong file can say which loader it belongs to.

Users keep diffusion models, text encoders and mmproj files side by side and pick from long lists;
the commonest mistake is a file of the right format but the wrong kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import GGUFFile

UNET_LOADER = "Load Qwen-Image UNet (GGUF)"
CLIP_LOADER = "Load Qwen CLIP-VL (GGUF)"
# The CLIP loader's input for each kind of file it takes (a pair, easily swapped).
CLIP_INPUTS = {"text_encoder": "clip_name", "mmproj": "mmproj_name"}


@dataclass(frozen=True)
class FileKind:
    role: str         # "diffusion_model", "text_encoder", "other_language_model", "mmproj", "vae" or "unknown"
    description: str  # for messages: "a Qwen2.5-VL language model (qwen2vl)"
    loader: str | None


# general.architecture values of llama.cpp language models this package can use as text encoders.
TEXT_ENCODER_ARCHS = {"qwen2vl": "Qwen2.5-VL", "qwen2": "Qwen2", "qwen3": "Qwen3"}


# general.architecture values the diffusion-model converters write, and the tensors that identify
# such a model (any prefix): a file naming one of them without those tensors is incomplete.
DIFFUSION_ARCHS = {"qwen_image": ("Qwen-Image", ("txt_norm.weight", "img_in.weight")),
                   "lumina2": ("Z-Image / Lumina 2", ("cap_embedder.1.weight",))}


def _has(gguf: GGUFFile, *suffixes: str) -> bool:
    return any(name.endswith(s) for name in gguf.tensors for s in suffixes)


def classify(gguf: GGUFFile) -> FileKind:
    arch = gguf.architecture
    names = gguf.tensors
    if arch == "clip" or gguf.get_str("general.type") == "mmproj" or any(n.startswith(("v.blk.", "mm.")) for n in names):
        return FileKind("mmproj", "an mmproj vision projector (llama.cpp clip)", CLIP_LOADER)
    if any(n.startswith("blk.") for n in names) or "token_embd.weight" in names:
        if arch in TEXT_ENCODER_ARCHS:
            return FileKind("text_encoder", f"a {TEXT_ENCODER_ARCHS[arch]} language model ({arch})", CLIP_LOADER)
        return FileKind("other_language_model", f"a {arch} language model (llama.cpp)", None)
    if _has(gguf, "txt_norm.weight") and _has(gguf, "img_in.weight"):
        return FileKind("diffusion_model", "a Qwen-Image diffusion model", UNET_LOADER)
    if _has(gguf, "cap_embedder.1.weight"):
        return FileKind("diffusion_model", "a Z-Image / Lumina 2 diffusion model", UNET_LOADER)
    if _has(gguf, "decoder.middle.0.residual.0.gamma", "decoder.conv_in.weight"):
        return FileKind("vae", "a VAE", None)
    if arch in DIFFUSION_ARCHS:
        model, needed = DIFFUSION_ARCHS[arch]
        lacking = " and ".join(n for n in needed if not _has(gguf, n))
        return FileKind("unknown", f"an incomplete {model} GGUF (its header says {arch!r}, but it lacks the "
                                   f"{lacking} tensor{'s' if ' and ' in lacking else ''})", None)
    desc = f"a GGUF of architecture {arch!r}" if arch else "a GGUF of unknown content"
    return FileKind("unknown", desc, None)


def wrong_kind_message(kind: FileKind, wanted: str) -> str:
    where = f"; load it with the '{kind.loader}' node" if kind.loader else ""
    return f"this is {kind.description}, not {wanted}{where}"
