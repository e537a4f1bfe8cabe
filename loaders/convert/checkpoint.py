"""Checkpoints to convert: a safetensors file read one tensor at a time, its names in the form the
GGUF will carry (ComfyUI's for diffusion models, llama.cpp's for language models), fp8 weights
decoded with their scales, and the model's architecture read from the shapes.

Comfy-Org's fp8 "scaled" files come in two layouts: the older one marks itself with a
``scaled_fp8`` tensor and scales each weight by ``<layer>.scale_weight``; the newer one describes
each layer in ``<layer>.comfy_quant`` (or all of them in the file's ``_quantization_metadata``) with
its scale in ``<layer>.weight_scale``. Input scales only matter to fp8 matmuls and are dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from gguf import GGMLQuantizationType as T
from safetensors import safe_open

from ..gguf.errors import GGUFError
from ..models.diffusion import INDEX_TIMESTEP_ZERO, NAME_MAPS, model_config, qkv_parts
from ..models.text_encoder import LLM_BLOCK_NAMES, VISION_BLOCK_NAMES, VISION_TOP_NAMES
from ..models.tokenizer import gguf_tokenizer_metadata

# Layers whose weight ComfyUI keeps in fp8 with one scale per tensor: the formats converted here.
FP8_FORMATS = {"float8_e4m3fn", "float8_e5m2"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_SCALE_KEYS = (".scale_weight", ".weight_scale")
_DROPPED = (".scale_input", ".input_scale", ".comfy_quant", ".scale_weight", ".weight_scale")
# Prefixes ComfyUI and other tools put before a text encoder's Hugging Face names.
_TEXT_PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.", "text_encoders.qwen3_4b.transformer.",
                  "qwen3_4b.transformer.", "language_model.")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {hf: gguf for gguf, hf in LLM_BLOCK_NAMES.items()}
_HF_VISION_BLOCK = re.compile(r"^visual\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_VISION_BLOCK = {hf: gguf for gguf, hf in VISION_BLOCK_NAMES.items()}
_GGUF_VISION_TOP = {hf: gguf for gguf, hf in VISION_TOP_NAMES.items()}
# Qwen2.5-VL's vision tower, the same in every size: heads 80 wide, full attention every 8th block
# (window attention between), OpenAI CLIP's normalisation. None of it is in the weights.
VISION_HEAD_DIM, VISION_WINDOW_PATTERN = 80, 8
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
DIFFUSION_ARCHS = {"qwen_image": "qwen_image", "z_image": "lumina2"}
DIFFUSION_PREFIX = "model.diffusion_model."


@dataclass
class Checkpoint:
    """A model to convert: each output tensor's shape, and how to read one in float32."""
    path: str     # what messages name: the input file, or the ComfyUI model
    kind: str     # "diffusion_model", "text_encoder" or "mmproj"
    arch: str     # general.architecture of the output
    variant: str  # for the log: "Qwen-Image-Edit-2511", "Z-Image", "Qwen2.5-VL", ...
    layers: int
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], torch.Tensor]
    half: T = T.F16  # the 16-bit type that holds every value of the input: BF16 for bf16 weights
    metadata: dict = field(default_factory=dict)
    gqa: int = 1     # query heads per key/value head (language models)
    tied: bool = False


def _reader(f: safe_open, parts: dict[str, list[str]], scales: dict[str, str]) -> Callable[[str], torch.Tensor]:
    """Reads an output tensor in float32 from its stored pieces, decoding fp8 with its scale."""
    def load(name: str) -> torch.Tensor:
        pieces = []
        for key in parts[name]:
            t = f.get_tensor(key)
            fp8 = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            t = t.float()
            if fp8 and key in scales:
                t = t * f.get_tensor(scales[key]).float()
            pieces.append(t)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return load


# Each architecture's tensors outside its numbered blocks, by name prefix.
DIFFUSION_TOP = {
    "qwen_image": ("img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "norm_out.", "proj_out.", INDEX_TIMESTEP_ZERO),
    "lumina2": ("x_embedder.", "t_embedder.", "cap_embedder.", "final_layer.", "x_pad_token", "cap_pad_token", "siglip"),
}
_NUMBERED = re.compile(r"^(.*?(?:blocks|layers|refiner|blk))\.(\d+)\.(.+)$")


def check_structure(path: str, shapes: dict[str, tuple[int, ...]], top: tuple[str, ...], what: str) -> None:
    """GGUFError listing what damages a model's structure: a tensor no part of it has a place for, an
    empty one, blocks not numbered 0 to n-1, a block whose tensors or shapes differ from its
    siblings' (the layout most blocks of its kind share)."""
    faults, kinds = [], {}
    for name, shape in shapes.items():
        block = _NUMBERED.match(name)
        if block:
            kinds.setdefault(block.group(1), {}).setdefault(int(block.group(2)), {})[block.group(3)] = shape
        elif not name.startswith(top):
            faults.append(f"unexpected {name}")
        if 0 in shape and name != INDEX_TIMESTEP_ZERO:
            faults.append(f"{name} is empty {list(shape)}")
    for kind, blocks in kinds.items():
        numbers = sorted(blocks)
        if numbers != list(range(len(numbers))):
            faults.append(f"{kind} blocks are numbered {numbers[:6]}{'...' if len(numbers) > 6 else ''}, not 0 to "
                          f"{len(numbers) - 1}")
        layouts = Counter(tuple(sorted(b.items())) for b in blocks.values())
        usual = dict(layouts.most_common(1)[0][0])
        for number in numbers:
            b = blocks[number]
            faults += [f"missing {kind}.{number}.{t}" for t in usual if t not in b]
            faults += [f"unexpected {kind}.{number}.{t}" for t in b if t not in usual]
            faults += [f"{kind}.{number}.{t} is {list(b[t])}, its other blocks' {list(usual[t])}"
                       for t in b if t in usual and b[t] != usual[t]]
    if faults:
        more = f" (and {len(faults) - 6} more)" if len(faults) > 6 else ""
        raise GGUFError(path, f"its tensors do not make a {what}: {'; '.join(faults[:6])}{more}")


def describe_diffusion(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str, int]:
    """(general.architecture, variant, block count) of a diffusion model in ComfyUI's names, from its
    shapes alone; GGUFError naming ``path`` for anything else."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    family, config, variant = model_config(meta, path)
    return DIFFUSION_ARCHS[family], variant, config.get("num_layers", config.get("n_layers"))


def _quant_layers(path: str, f: safe_open, keys: list[str]) -> dict[str, dict]:
    """ComfyUI's per-layer quantization descriptions, from either of its layouts."""
    meta = f.metadata() or {}
    if "_quantization_metadata" in meta:
        try:
            layers = json.loads(meta["_quantization_metadata"])["layers"]
        except (ValueError, KeyError, TypeError):
            layers = None
        if not isinstance(layers, dict):
            raise GGUFError(path, "its _quantization_metadata is not ComfyUI's JSON description of its layers")
        return layers
    layers = {}
    for key in keys:
        if key.endswith(".comfy_quant"):
            try:
                layers[key[:-len(".comfy_quant")]] = json.loads(bytes(f.get_tensor(key).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise GGUFError(path, f"{key} is not ComfyUI's JSON description of a quantized layer") from None
    if any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in keys):
        layers.update({k[:-len(".scale_weight")]: {"format": "float8_e4m3fn"} for k in keys if k.endswith(".scale_weight")})
    return layers


def _weights(path: str, f: safe_open) -> tuple[list[str], dict[str, str], T]:
    """The file's weight keys, the keys of their fp8 scales, and the 16-bit type holding its values."""
    keys = list(f.keys())
    for layer, conf in _quant_layers(path, f, keys).items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt is None:
            raise GGUFError(path, f"layer {layer}'s quantization description names no format")
        if fmt not in FP8_FORMATS:
            raise GGUFError(path, f"layer {layer} is stored in ComfyUI's {fmt!r} format, which cannot be converted "
                                  f"(fp8 with one scale per tensor can: {', '.join(sorted(FP8_FORMATS))}); "
                                  "convert from the model's bf16 or fp16 file")
    scales = {}
    for key in keys:
        for suffix in _SCALE_KEYS:
            if key.endswith(suffix):
                scales[key[:-len(suffix)] + ".weight"] = key
    names = [k for k in keys if not (k == "scaled_fp8" or k.endswith(".scaled_fp8") or k.endswith(_DROPPED))]
    dtypes = {k: str(f.get_slice(k).get_dtype()) for k in names}
    for key, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES and 0 not in _shape(f, key):
            raise GGUFError(path, f"tensor {key} holds {dtype} values: model weights are floating point")
    return names, scales, T.BF16 if "BF16" in dtypes.values() else T.F16


def _shape(f: safe_open, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in f.get_slice(key).get_shape())


def _strip_text_prefix(keys: list[str]) -> dict[str, str]:
    """Hugging Face name -> stored key."""
    return {next((k[len(p):] for p in _TEXT_PREFIXES if k.startswith(p)), k): k for k in keys}


def _diffusion(path: str, f: safe_open, stored: list[str], scales: dict[str, str], half: T) -> Checkpoint:
    naming = next(m for m in NAME_MAPS if m.detect(stored))
    parts = {naming.rename(k): [k] for k in stored}
    for fused, separate in qkv_parts(list(parts)).items():
        parts[fused] = [parts.pop(p)[0] for p in separate]
    shapes = {}
    for name, keys in parts.items():
        pieces = [_shape(f, k) for k in keys]
        shapes[name] = pieces[0] if len(pieces) == 1 else (sum(p[0] for p in pieces), *pieces[0][1:])
    arch, variant, layers = describe_diffusion(path, shapes)
    check_structure(path, shapes, DIFFUSION_TOP[arch], f"{variant} model")
    return Checkpoint(path, "diffusion_model", arch, variant, layers, shapes, _reader(f, parts, scales), half)


def _text_encoder(path: str, f: safe_open, stored: list[str], scales: dict[str, str], half: T,
                  tokenizer: str | os.PathLike | None) -> Checkpoint:
    hf = _strip_text_prefix(stored)
    parts, shapes, unknown = {}, {}, []
    for name, key in hf.items():
        m = _HF_BLOCK.match(name)
        if m and m.group(2) in _GGUF_BLOCK:
            out = f"blk.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
        elif name in _HF_TOP:
            out = _HF_TOP[name]
        else:
            if not name.startswith("visual.") and "rotary_emb" not in name:  # an mmproj of its own; computed
                unknown.append(name)
            continue
        parts[out] = [key]
        shapes[out] = _shape(f, key)
    if unknown:
        raise GGUFError(path, f"a language model with tensors Qwen2.5-VL and Qwen3 have no place for: "
                              f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
    for needed in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight"):
        if needed not in shapes:
            raise GGUFError(path, f"a language model without {needed} (Hugging Face names): not a complete "
                                  "Qwen2.5-VL or Qwen3 text encoder")
    check_structure(path, shapes, ("token_embd.", "output_norm.", "output."), "Qwen2.5-VL or Qwen3 language model")
    vocab, hidden = shapes["token_embd.weight"]
    qk_norm = "blk.0.attn_q_norm.weight" in shapes
    head_dim = shapes["blk.0.attn_q_norm.weight"][0] if qk_norm else 128  # every Qwen2.5 from 3B up
    heads, kv_heads = shapes["blk.0.attn_q.weight"][0] // head_dim, shapes["blk.0.attn_k.weight"][0] // head_dim
    if not heads or not kv_heads or heads % kv_heads:
        raise GGUFError(path, f"its attention projections ({shapes['blk.0.attn_q.weight'][0]} and "
                              f"{shapes['blk.0.attn_k.weight'][0]} rows) do not split into heads of {head_dim}")
    layers = len({n.split(".")[1] for n in shapes if n.startswith("blk.")})
    arch = "qwen3" if qk_norm else "qwen2vl" if any(k.startswith("visual.") for k in hf) else "qwen2"
    # Not in the weights: the values of ComfyUI's own configs of these models.
    meta = {f"{arch}.block_count": layers, f"{arch}.context_length": 40960 if arch == "qwen3" else 128000,
            f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": shapes["blk.0.ffn_gate.weight"][0],
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
            f"{arch}.rope.freq_base": 1000000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6}
    if arch == "qwen2vl":
        meta["qwen2vl.rope.dimension_sections"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16, 0]
    if arch == "qwen3":
        meta["qwen3.attention.key_length"] = meta["qwen3.attention.value_length"] = head_dim
    if tokenizer is not None:
        meta.update(gguf_tokenizer_metadata(Path(tokenizer), vocab))
    variant = {"qwen3": "Qwen3", "qwen2vl": "Qwen2.5-VL", "qwen2": "Qwen2.5"}[arch]
    return Checkpoint(path, "text_encoder", arch, variant, layers, shapes, _reader(f, parts, scales), half, meta,
                      gqa=heads // kv_heads, tied="output.weight" not in shapes)


def vision_pieces(hf: dict[str, str]) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """llama.cpp's mmproj name -> (stored key, the piece of it): the temporal patch kernel split in
    two halves, the fused q/k/v in three."""
    pieces = {}
    for name, key in hf.items():
        block = _HF_VISION_BLOCK.match(name)
        if name == "visual.patch_embed.proj.weight":
            pieces["v.patch_embd.weight"] = (key, lambda t: t[:, :, 0])
            pieces["v.patch_embd.weight.1"] = (key, lambda t: t[:, :, 1])
        elif block and block.group(2) == "attn.qkv":
            for i, piece in enumerate(("attn_q", "attn_k", "attn_v")):
                pieces[f"v.blk.{block.group(1)}.{piece}.{block.group(3)}"] = (key, lambda t, i=i: t.chunk(3)[i])
        elif block and block.group(2) in _GGUF_VISION_BLOCK:
            pieces[f"v.blk.{block.group(1)}.{_GGUF_VISION_BLOCK[block.group(2)]}.{block.group(3)}"] = (key, lambda t: t)
        elif name.rsplit(".", 1)[0] in _GGUF_VISION_TOP:
            top, part = name.rsplit(".", 1)
            pieces[f"{_GGUF_VISION_TOP[top]}.{part}"] = (key, lambda t: t)
    return pieces


def open_mmproj_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The vision tower of a Qwen2.5-VL checkpoint (``visual.*``, as Comfy-Org's text-encoder files hold
    it) as llama.cpp's mmproj, or GGUFError naming the file."""
    path = os.fspath(path)
    f = _safe_open(path)
    stored, scales, half = _weights(path, f)
    hf = _strip_text_prefix(stored)
    pieces = vision_pieces(hf)
    used = {key for key, _ in pieces.values()}
    unknown = [name for name, key in hf.items() if name.startswith("visual.") and key not in used]
    if unknown:
        raise GGUFError(path, f"a vision tower with tensors Qwen2.5-VL's has no place for: {', '.join(unknown[:6])}")
    for needed in ("v.patch_embd.weight", "v.blk.0.attn_q.weight", "v.blk.0.ffn_up.weight", "mm.2.weight"):
        if needed not in pieces:
            raise GGUFError(path, f"no Qwen2.5-VL vision tower here ({needed} has no visual.* source)")
    shapes = {name: tuple(fn(torch.empty(_shape(f, key), device="meta")).shape) for name, (key, fn) in pieces.items()}
    check_structure(path, shapes, ("v.patch_embd.", "v.post_ln.", "mm."), "Qwen2.5-VL vision tower")
    hidden, _, patch, _ = shapes["v.patch_embd.weight"]
    layers = len({n.split(".")[2] for n in shapes if n.startswith("v.blk.")})
    meta = {"general.type": "mmproj", "clip.has_vision_encoder": True, "clip.projector_type": "qwen2.5vl_merger",
            "clip.use_silu": True, "clip.vision.image_size": 560, "clip.vision.patch_size": patch,
            "clip.vision.embedding_length": hidden, "clip.vision.feed_forward_length": shapes["v.blk.0.ffn_up.weight"][0],
            "clip.vision.projection_dim": shapes["mm.2.weight"][0], "clip.vision.block_count": layers,
            "clip.vision.attention.head_count": hidden // VISION_HEAD_DIM,
            "clip.vision.attention.layer_norm_epsilon": 1e-6, "clip.vision.n_wa_pattern": VISION_WINDOW_PATTERN,
            "clip.vision.image_mean": CLIP_MEAN, "clip.vision.image_std": CLIP_STD}

    read = _reader(f, {name: [key] for name, (key, _) in pieces.items()}, scales)

    def load(name: str) -> torch.Tensor:
        return pieces[name][1](read(name)).contiguous()
    return Checkpoint(path, "mmproj", "clip", "Qwen2.5-VL vision tower", layers, shapes, load, half, meta)


def _safe_open(path: str) -> safe_open:
    if os.path.isdir(path):
        raise GGUFError(None, f"{path} is a folder, not a safetensors file")
    if not os.path.isfile(path):
        raise GGUFError(path, "no such file")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors' own errors for a truncated or foreign file
        raise GGUFError(path, f"not a readable safetensors file ({e})") from None


def open_checkpoint(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Checkpoint:
    """A safetensors checkpoint of a Qwen-Image / Z-Image diffusion model or a Qwen2.5-VL / Qwen3 text
    encoder (``tokenizer``: the Hugging Face tokenizer folder its GGUF carries), or GGUFError naming
    the file and what it is instead."""
    path = os.fspath(path)
    f = _safe_open(path)
    stored, scales, half = _weights(path, f)
    if not stored:
        raise GGUFError(path, "holds no tensors")
    if any(n.endswith(("txt_norm.weight", "cap_embedder.1.weight")) for n in stored):
        # An all-in-one checkpoint (VAE and text encoder beside it): its diffusion model alone.
        prefixed = [n for n in stored if n.startswith(DIFFUSION_PREFIX)]
        return _diffusion(path, f, prefixed or stored, scales, half)
    if any(_HF_BLOCK.match(n) for n in _strip_text_prefix(stored)):
        return _text_encoder(path, f, stored, scales, half, tokenizer)
    raise GGUFError(path, "unknown architecture: neither a Qwen-Image / Z-Image diffusion model nor a "
                          f"Qwen2.5-VL / Qwen3 language model (first tensors: {', '.join(stored[:3])})")
