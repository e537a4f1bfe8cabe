"""GGUF diffusion models: name maps to ComfyUI's keys and model configs read from the weights.

ComfyUI's own detection reads a block count and assumes every width of the full-size model; here
every width, head count and marker comes from the tensors themselves, so any size of these
architectures loads. The result is plain data (a family name, constructor arguments and a state
dict); the node turns it into ComfyUI's model classes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..gguf.errors import GGUFError
from ..gguf.file_kind import classify, wrong_kind_message
from ..gguf.reader import GGUFFile
from ..gguf.state_dict import load_state_dict, quant_summary
from ..quant.weight import cat_rows, logical_shape

INDEX_TIMESTEP_ZERO = "__index_timestep_zero__"


@dataclass
class NameMap:
    """One naming convention of diffusion-model GGUFs in the wild."""
    name: str
    detect: Callable[[list[str]], bool]
    rename: Callable[[str], str]
    fuse: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]] = lambda sd, path: sd


def _strip(prefix: str) -> Callable[[str], str]:
    return lambda n: n[len(prefix):] if n.startswith(prefix) else n


# Tongyi's original Z-Image names: separate q/k/v, "-2-1" patch-size suffixes.
_ZIMAGE_RENAMES = (("attention.norm_q.", "attention.q_norm."), ("attention.norm_k.", "attention.k_norm."),
                   ("attention.to_out.0.", "attention.out."), ("all_x_embedder.2-1.", "x_embedder."),
                   ("all_final_layer.2-1.", "final_layer."))
_QKV = re.compile(r"^(.*\.attention\.)to_q\.(weight|bias)$")


def _zimage_rename(name: str) -> str:
    name = _strip("model.diffusion_model.")(name)
    for old, new in _ZIMAGE_RENAMES:
        name = name.replace(old, new)
    return name


def qkv_parts(names: list[str]) -> dict[str, list[str]]:
    """The fused attention.qkv names of separate q/k/v projections -> the names they are made of."""
    groups = (_QKV.match(k) for k in names)
    return {f"{m.group(1)}qkv.{m.group(2)}": [f"{m.group(1)}to_{p}.{m.group(2)}" for p in "qkv"] for m in groups if m}


def _fuse_qkv(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    for fused, parts in qkv_parts(list(sd)).items():
        lacking = [p for p in parts if p not in sd]
        if lacking:
            raise GGUFError(path, f"{', '.join(lacking)} missing beside {parts[0]}: the separate q, k and v "
                                  "projections come in threes")
        shapes = [tuple(logical_shape(sd[p])) for p in parts]
        if len({s[1:] for s in shapes}) != 1:
            raise GGUFError(path, f"the q, k and v projections {', '.join(parts)} have shapes {shapes}, which "
                                  "differ past their rows: damaged tensors")
        sd[fused] = cat_rows([sd.pop(p) for p in parts])
    return sd


# First match wins; order from most to least specific.
NAME_MAPS: list[NameMap] = [
    NameMap("z-image original (separate q/k/v)",
            lambda names: any(n.endswith("attention.to_q.weight") for n in names),
            _zimage_rename, _fuse_qkv),
    NameMap("stable-diffusion.cpp (model.diffusion_model. prefix)",
            lambda names: all(n.startswith("model.diffusion_model.") for n in names),
            _strip("model.diffusion_model.")),
    NameMap("ComfyUI / city96", lambda names: True, lambda n: n),
]


@dataclass
class DiffusionModel:
    """A GGUF diffusion model ready to be instantiated: family, constructor arguments, weights."""
    path: str
    family: str                 # "qwen_image" or "z_image"
    variant: str                # for the log: "Qwen-Image-Edit-2511", ...
    unet_config: dict
    state_dict: dict[str, torch.Tensor]
    naming: str
    summary: str = field(default="")


def _count_blocks(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def _shape(sd: dict, key: str, path: str, dims: int) -> torch.Size:
    """The shape of tensor ``key``, which must be there with ``dims`` dimensions."""
    if key not in sd:
        raise GGUFError(path, f"missing tensor {key!r}: not a complete model of this architecture")
    shape = logical_shape(sd[key])
    if len(shape) != dims:
        raise GGUFError(path, f"tensor {key!r} has shape {tuple(shape)}, where a {dims}-D one belongs: damaged tensors")
    return shape


def rope_axes(head_dim: int, first_fraction: int, real: tuple[int, int, int]) -> tuple[int, int, int]:
    """Rope axis split for a head size: the real models' split, scaled down for smaller heads."""
    if head_dim == sum(real):
        return real
    first = 2 * max(1, head_dim // first_fraction // 2)
    rest = head_dim - first
    if rest % 4:
        raise ValueError(f"attention head size {head_dim} cannot be split into rotary axes")
    return first, rest // 2, rest // 2


def _heads(width: int, head_dim: int, path: str) -> int:
    if not head_dim or not width or width % head_dim:
        raise GGUFError(path, f"width {width} does not split into attention heads of width {head_dim} "
                              "(read from the q norm): damaged tensors")
    return width // head_dim


def _rope(head_dim: int, first_fraction: int, real: tuple[int, int, int], path: str) -> tuple[int, int, int]:
    try:
        return rope_axes(head_dim, first_fraction, real)
    except ValueError as e:
        raise GGUFError(path, str(e)) from None


def qwen_image_config(sd: dict, path: str) -> tuple[dict, str]:
    in_features = _shape(sd, "img_in.weight", path, 2)
    inner, in_channels = in_features[0], in_features[1]
    head_dim = _shape(sd, "transformer_blocks.0.attn.norm_q.weight", path, 1)[0]
    _heads(inner, head_dim, path)
    patch = int(math.isqrt(in_channels // 16)) if in_channels % 16 == 0 else 0
    if not patch or patch * patch * 16 != in_channels:
        raise GGUFError(path, f"img_in takes {in_channels} channels; Qwen-Image takes 16-channel latents "
                              "in square patches (64 for 2x2)")
    config = {
        "image_model": "qwen_image",
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": _shape(sd, "proj_out.weight", path, 2)[0] // (patch * patch),
        "num_layers": _count_blocks(sd, "transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(sd, "txt_norm.weight", path, 1)[0],
        "axes_dims_rope": _rope(head_dim, 8, (16, 56, 56), path),
    }
    variant = "Qwen-Image"
    if INDEX_TIMESTEP_ZERO in sd:
        config["default_ref_method"] = "index_timestep_zero"
        variant = "Qwen-Image-Edit-2511"
    if "time_text_embed.addition_t_embedding.weight" in sd:
        config["use_additional_t_cond"] = True
        config["default_ref_method"] = "negative_index"
        variant = "Qwen-Image-Layered"
    return config, variant


def z_image_config(sd: dict, path: str) -> tuple[dict, str]:
    dim, cap_feat_dim = _shape(sd, "cap_embedder.1.weight", path, 2)
    head_dim = _shape(sd, "layers.0.attention.q_norm.weight", path, 1)[0]
    qkv_rows = _shape(sd, "layers.0.attention.qkv.weight", path, 2)[0]
    n_heads = _heads(dim, head_dim, path)
    if qkv_rows % head_dim or qkv_rows // head_dim <= n_heads or (qkv_rows // head_dim - n_heads) % 2:
        raise GGUFError(path, f"the fused qkv projection's {qkv_rows} rows do not split into {n_heads} query heads "
                              f"and key/value heads of width {head_dim}: damaged tensors")
    ffn_hidden = _shape(sd, "layers.0.feed_forward.w1.weight", path, 2)[0]
    patch_in = _shape(sd, "x_embedder.weight", path, 2)[1]
    config = {
        "image_model": "lumina2",
        "patch_size": 2,
        "in_channels": patch_in // 4,
        "dim": dim,
        "cap_feat_dim": cap_feat_dim,
        "n_layers": _count_blocks(sd, "layers."),
        "n_refiner_layers": _count_blocks(sd, "noise_refiner."),
        "n_heads": n_heads,
        "n_kv_heads": (qkv_rows // head_dim - n_heads) // 2,
        "qk_norm": True,
        # Half an element over keeps int(multiplier * dim) at the stored width despite float rounding.
        "ffn_dim_multiplier": (ffn_hidden + 0.5) / dim,
        "multiple_of": 1,
        "axes_dims": _rope(head_dim, 4, (32, 48, 48), path),
        "axes_lens": (1536, 512, 512),
        "rope_theta": 256.0,
        "z_image_modulation": True,
        "time_scale": 1000.0,
    }
    if "cap_pad_token" in sd:
        config["pad_tokens_multiple"] = 32
    if "siglip_embedder.0.weight" in sd:
        config["siglip_feat_dim"] = _shape(sd, "siglip_embedder.0.weight", path, 1)[0]
    return config, "Z-Image"


def _is_z_image(sd: dict, path: str) -> bool:
    # Z-Image's timestep embedder ends in 256 features (z_image_modulation); Lumina 2's in the model width.
    dim = _shape(sd, "cap_embedder.1.weight", path, 2)[0]
    t_out = _shape(sd, "t_embedder.mlp.2.weight", path, 2)[0]
    return "x_pad_token" in sd or (t_out == 256 and dim != 256)


def model_config(sd: dict, path: str) -> tuple[str, dict, str]:
    """(family, ComfyUI config, variant) of a state dict in ComfyUI's names (tensors or shape-only
    meta tensors), or GGUFError saying what the weights are instead."""
    if "txt_norm.weight" in sd:
        return "qwen_image", *qwen_image_config(sd, path)
    if "cap_embedder.1.weight" in sd:
        if not _is_z_image(sd, path):
            raise GGUFError(path, "a Lumina 2 family model that is not Z-Image; only Z-Image is supported")
        return "z_image", *z_image_config(sd, path)
    raise GGUFError(path, "not a Qwen-Image or Z-Image diffusion model (no txt_norm or cap_embedder weights)")


def open_diffusion_model(path: str) -> DiffusionModel:
    """Read a GGUF diffusion model, or raise GGUFError saying what the file is instead."""
    gguf = GGUFFile(path)
    kind = classify(gguf)
    if kind.role != "diffusion_model":
        raise GGUFError(path, wrong_kind_message(kind, "a Qwen-Image or Z-Image diffusion model"))
    names = list(gguf.tensors)
    naming = next(m for m in NAME_MAPS if m.detect(names))
    sd = naming.fuse(load_state_dict(gguf, naming.rename), path)
    family, config, variant = model_config(sd, path)
    return DiffusionModel(path, family, variant, config, sd, naming.name, quant_summary(gguf))
