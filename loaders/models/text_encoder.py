"""llama.cpp text-encoder GGUFs (Qwen2.5-VL, Qwen2, Qwen3) and their mmproj vision files.

Tensor names are mapped to Hugging Face's (``model.layers.N.self_attn.q_proj``, ``visual.blocks.N``),
the names ComfyUI's text-encoder classes use; the model config comes from the file's metadata and
shapes, so any size loads. The two files are checked against each other when they are opened: an
mmproj whose projection width differs from the language model's hidden size is the cause of the
"mat1 and mat2 shapes cannot be multiplied" error other loaders end in, deep inside an edit.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer

from ..gguf.errors import GGUFError
from ..gguf.file_kind import CLIP_INPUTS, CLIP_LOADER, classify, wrong_kind_message
from ..gguf.reader import GGUFFile
from ..gguf.state_dict import check_tensors, quant_summary, tensor_from_file
from ..quant.weight import cat_rows, dequantize, logical_shape
from .tokenizer import build_tokenizer, has_tokenizer

log = logging.getLogger(__name__)

# How Qwen2.5-VL's files name it: "Qwen2.5-VL-7B-Instruct", "Qwen2.5 VL 7B", "qwen_2.5_vl_7b".
QWEN25_VL_NAME = re.compile(r"qwen[-_ ]?2\.5[-_ ]?vl", re.IGNORECASE)

# llama.cpp block tensor names -> Hugging Face names, one entry per tensor kind.
LLM_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# output: the language model's own output head (untied in Qwen2.5-VL-7B), read for text generation only.
LLM_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "model.lm_head"}

VISION_BLOCK_NAMES = {
    "attn_out": "attn.proj",
    "ln1": "norm1",
    "ln2": "norm2",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
VISION_TOP_NAMES = {"v.post_ln": "visual.merger.ln_q", "mm.0": "visual.merger.mlp.0", "mm.2": "visual.merger.mlp.2"}

_BLOCK = re.compile(r"^(v\.)?blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_TOP = re.compile(r"^(.+)\.(weight|bias)$")

# Which ComfyUI text encoder each language-model family feeds.
FAMILY_OF_ARCH = {"qwen2vl": "qwen25vl", "qwen2": "qwen25vl", "qwen3": "qwen3"}


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    patch_size: int
    output_hidden_size: int
    fullatt_block_indexes: list[int]
    spatial_merge_size: int = 2


@dataclass
class TextEncoder:
    llm_path: str
    mmproj_path: str | None
    family: str            # "qwen25vl" (Qwen-Image) or "qwen3" (Z-Image)
    config: dict           # Hugging Face style sizes of the language model
    vision: VisionConfig | None
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None = field(repr=False)  # the file's own, None where it carries none
    summary: str = ""


def _llm_name(name: str) -> str | None:
    m = _BLOCK.match(name)
    if m and not m.group(1):
        kind = LLM_BLOCK_NAMES.get(m.group(3))
        return None if kind is None else f"model.layers.{m.group(2)}.{kind}.{m.group(4)}"
    m = _TOP.match(name)
    if m and m.group(1) in LLM_TOP_NAMES:
        return f"{LLM_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None  # rope tables: computed by ComfyUI's model


def _count(names, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for n in names if (m := rx.match(n))})


def _rope_sections(gguf: GGUFFile, arch: str, head_dim: int) -> list[int]:
    """M-RoPE sections (time, height, width) in rotary pairs: they cover half the head."""
    key = f"{arch}.rope.dimension_sections"
    sections = gguf.get(key)
    if sections is None:
        # Qwen2.5-VL's split ([16, 24, 24] for 128-wide heads) scaled to the head size.
        first = head_dim // 8
        rest = head_dim // 2 - first
        return [first, rest // 2, rest - rest // 2]
    values = [int(s) for s in sections] if isinstance(sections, np.ndarray) and sections.dtype.kind in "iu" else None
    # Sections that do not cover the head are damage, of them or of the head count the head size came from.
    if values is None or any(v < 0 for v in values) or sum(values) != head_dim // 2:
        raise GGUFError(gguf.path, f"corrupt header: {key} is {sections!r}, not sections covering the "
                                   f"{head_dim // 2} rotary pairs of its {head_dim}-wide attention heads (the "
                                   "sections or the attention head count are damaged)")
    return [v for v in values if v > 0]


def _number(gguf: GGUFFile, key: str, kind: type, default, positive: bool = True, at_most: float | None = None):
    """A hyperparameter from the header, checked for its type, sign and, where given, a bound no real
    model comes near (absent: ``default``)."""
    value = gguf.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or (positive and not value > 0) or (kind is float and not math.isfinite(value)):
        raise GGUFError(gguf.path, f"corrupt header: {key} is {value!r}, not a {'positive ' if positive else ''}"
                                   f"{'number' if kind is float else 'integer'}")
    if at_most is not None and value > at_most:
        raise GGUFError(gguf.path, f"corrupt header: {key} is {value!r}, beyond any model's (at most {at_most:g})")
    return kind(value)


def _warn_if_text_only(gguf: GGUFFile) -> None:
    """A plain ``qwen2`` file is either Qwen2.5-VL's language model saved under that architecture or a
    text-only Qwen2.5, of the same shapes; only the first gives Qwen-Image the conditioning it was
    trained on, the other runs into wrong images. Only the names can tell them apart: the model's
    (``general.name``, ``general.basename``) or the file's."""
    if gguf.architecture != "qwen2":
        return
    names = [n for n in (gguf.get("general.name"), gguf.get("general.basename"), os.path.basename(gguf.path))
             if isinstance(n, str) and n]
    if not any(QWEN25_VL_NAME.search(n) for n in names):
        log.warning("GGUF text encoder %s: a plain qwen2 language model named %r, not Qwen2.5-VL: Qwen-Image "
                    "needs Qwen2.5-VL-7B-Instruct's language model; a text-only Qwen2.5 of the same size loads "
                    "but gives wrong images", gguf.path, names[0])


def _check_block_count(gguf: GGUFFile, key: str, found: int, what: str) -> None:
    """The header's block count against the blocks whose tensors the file holds. The config comes from
    the tensors, so a file missing its last blocks would otherwise load as a shallower model and
    encode silently wrong; llama.cpp refuses such a file too."""
    declared = _number(gguf, key, int, None)
    if declared is not None and declared != found:
        raise GGUFError(gguf.path, f"its header says {declared} {what} ({key}) but it holds the tensors of {found}: "
                                   "the file is incomplete or was made wrong; download or convert it again")


def _shape_of(sd: dict, key: str, path: str, dims: int) -> tuple[int, ...]:
    if key not in sd:
        raise GGUFError(path, f"missing tensor for {key!r}: not a complete model")
    shape = tuple(logical_shape(sd[key]))
    if len(shape) != dims:
        raise GGUFError(path, f"tensor for {key!r} has shape {list(shape)}, expected {dims} dimensions")
    return shape


def expected_llm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor ComfyUI's language model of this config holds, with its shape."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q, kv, inter = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim, \
        config["intermediate_size"]
    out = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if config["lm_head"]:
        out["model.lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}."
        out.update({b + "input_layernorm.weight": (hidden,), b + "post_attention_layernorm.weight": (hidden,),
                    b + "self_attn.q_proj.weight": (q, hidden), b + "self_attn.k_proj.weight": (kv, hidden),
                    b + "self_attn.v_proj.weight": (kv, hidden), b + "self_attn.o_proj.weight": (hidden, q),
                    b + "mlp.gate_proj.weight": (inter, hidden), b + "mlp.up_proj.weight": (inter, hidden),
                    b + "mlp.down_proj.weight": (hidden, inter)})
        if config["qkv_bias"]:
            out.update({b + "self_attn.q_proj.bias": (q,), b + "self_attn.k_proj.bias": (kv,),
                        b + "self_attn.v_proj.bias": (kv,)})
        if config["qk_norm"]:
            out.update({b + "self_attn.q_norm.weight": (head_dim,), b + "self_attn.k_norm.weight": (head_dim,)})
    return out


def llm_config(gguf: GGUFFile, sd: dict) -> dict:
    arch = gguf.architecture
    path = gguf.path
    vocab, hidden = _shape_of(sd, "model.embed_tokens.weight", path, 2)
    heads = _number(gguf, f"{arch}.attention.head_count", int, None)
    q_rows = _shape_of(sd, "model.layers.0.self_attn.q_proj.weight", path, 2)[0]
    k_rows = _shape_of(sd, "model.layers.0.self_attn.k_proj.weight", path, 2)[0]
    head_dim = _number(gguf, f"{arch}.attention.key_length", int, None) or (q_rows // heads if heads else 128)
    heads = heads or q_rows // head_dim
    if not heads or not head_dim or q_rows != heads * head_dim or not k_rows or k_rows % head_dim \
            or heads % (k_rows // head_dim):
        raise GGUFError(path, f"{heads} attention heads of width {head_dim} do not fit its q ({q_rows} rows) and "
                              f"k ({k_rows} rows) projections: damaged header or tensors")
    layers = _count(sd, r"^model\.layers\.(\d+)\.")
    _check_block_count(gguf, f"{arch}.block_count", layers, "layers")
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape_of(sd, "model.layers.0.mlp.up_proj.weight", path, 2)[0],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": k_rows // head_dim,
        "head_dim": head_dim,
        # Qwen's are 1e-6 and 1e6 (long-context variants 1e7): far past these a value is damage, and
        # the model would still run, into silently wrong conditioning.
        "rms_norm_eps": _number(gguf, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-6, at_most=1e-2),
        "rope_theta": _number(gguf, f"{arch}.rope.freq_base", float, 1e6, at_most=1e10),
        "qkv_bias": "model.layers.0.self_attn.q_proj.bias" in sd,
        "qk_norm": "model.layers.0.self_attn.q_norm.weight" in sd,
        # Without its own output head a model generates text through its token table (tied weights).
        "lm_head": "model.lm_head.weight" in sd,
    }
    if FAMILY_OF_ARCH[arch] == "qwen25vl":
        config["rope_dims"] = _rope_sections(gguf, arch, head_dim)
    return config


def _open(path: str, role: str, wanted: str, slot: str, beside: str | None = None) -> GGUFFile:
    gguf = GGUFFile(path)
    kind = classify(gguf)
    if kind.role == "other_language_model" and role == "text_encoder":
        raise GGUFError(path, f"this is {kind.description}; the text encoder must be a Qwen language model: "
                              f"Qwen2.5-VL for Qwen-Image and its edit models, Qwen3 for Z-Image")
    if kind.role != role:
        hint = f" (it was chosen as the {slot}{'' if beside is None else ', beside ' + beside})"
        if kind.role in CLIP_INPUTS:
            # The pair swapped in the very node that takes both: say which input each goes in.
            raise GGUFError(path, f"this is {kind.description}, not {wanted}{hint}: in the '{CLIP_LOADER}' node "
                                  f"it goes in {CLIP_INPUTS[kind.role]}, and {wanted} in {CLIP_INPUTS[role]}")
        raise GGUFError(path, wrong_kind_message(kind, wanted) + hint)
    return gguf


def open_text_encoder(llm_path: str, mmproj_path: str | None = None) -> TextEncoder:
    """Read a language-model GGUF and, optionally, its mmproj; raise GGUFError naming the file at fault."""
    gguf = _open(llm_path, "text_encoder", "a language model (text encoder) GGUF", "language model")
    arch = gguf.architecture
    sd = {}
    for info in gguf.tensors.values():
        key = _llm_name(info.name)
        if key is not None:
            sd[key] = tensor_from_file(gguf, info)
    for required in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.mlp.up_proj.weight"):
        if required not in sd:
            raise GGUFError(llm_path, f"missing tensor for {required!r}: not a complete {arch} model")
    config = llm_config(gguf, sd)
    check_tensors(llm_path, sd, expected_llm_shapes(config), f"{arch} language model of {config['num_hidden_layers']} "
                                                           f"layers and width {config['hidden_size']}")
    _warn_if_text_only(gguf)
    vision = None
    summary = quant_summary(gguf)
    if mmproj_path and FAMILY_OF_ARCH[arch] != "qwen25vl":
        raise GGUFError(mmproj_path, f"{os.path.basename(llm_path)} is a {arch} language model, which takes no "
                                     "vision tower (Z-Image encodes text only): set mmproj_name to none")
    if mmproj_path:
        vision, vision_sd = open_mmproj(mmproj_path, llm_path, config["hidden_size"])
        sd.update(vision_sd)
    tokenizer = build_tokenizer(gguf) if has_tokenizer(gguf) else None
    rows = logical_shape(sd["model.embed_tokens.weight"])[0]
    top = max(tokenizer.get_vocab().values(), default=0) if tokenizer is not None else 0
    if top >= rows:
        raise GGUFError(llm_path, f"its tokenizer has ids up to {top:,} but its token table only {rows:,} rows "
                                  "(corrupt header)")
    config["stop_tokens"] = stop_tokens(gguf, tokenizer, rows)
    return TextEncoder(llm_path, mmproj_path, FAMILY_OF_ARCH[arch], config, vision, sd, tokenizer, summary)


# The tokens ending a Qwen chat turn, by name (the same ids in every Qwen tokenizer since Qwen2).
QWEN_STOP_TOKENS = {"<|im_end|>": 151645, "<|endoftext|>": 151643}


def stop_tokens(gguf: GGUFFile, tokenizer: Tokenizer | None, rows: int) -> list[int]:
    """The ids that end a generated answer: the chat turn's end and end of text (by the file's own
    tokenizer where it has one, else Qwen's ids), and the file's end-of-sequence id; all in its table."""
    ids = {tokenizer.token_to_id(name) if tokenizer is not None else qwen_id
           for name, qwen_id in QWEN_STOP_TOKENS.items()}
    eos = gguf.get("tokenizer.ggml.eos_token_id")
    if isinstance(eos, (int, np.integer)) and not isinstance(eos, bool):
        ids.add(int(eos))
    return sorted(i for i in ids if i is not None and 0 <= i < rows)


def open_mmproj(path: str, llm_path: str, llm_hidden: int) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    llm_name = os.path.basename(llm_path)
    gguf = _open(path, "mmproj", "an mmproj vision file", "mmproj", llm_name)
    projector = gguf.get("clip.projector_type")
    if projector is not None and str(projector) not in ("qwen2.5vl_merger", "qwen2vl_merger"):
        raise GGUFError(path, f"mmproj projector {projector!r} is not a Qwen2.5-VL vision tower")
    names = gguf.tensors
    if "v.patch_embd.weight" not in names or "mm.2.weight" not in names:
        raise GGUFError(path, "not a Qwen2.5-VL mmproj: it lacks v.patch_embd.weight or mm.2.weight")
    projection = names["mm.2.weight"].shape[0]
    if projection != llm_hidden:
        raise GGUFError(path, f"this mmproj projects to width {projection} but the language model "
                              f"{llm_name} has hidden size {llm_hidden}: they belong to different model sizes "
                              "(use the mmproj file published with this language model)")
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for info in names.values():
        m = _BLOCK.match(info.name)
        if m and m.group(1):
            block, kind, part = m.group(2), m.group(3), m.group(4)
            if kind in ("attn_q", "attn_k", "attn_v"):
                qkv.setdefault((block, part), {})[kind] = tensor_from_file(gguf, info)
                continue
            if kind in VISION_BLOCK_NAMES:
                sd[f"visual.blocks.{block}.{VISION_BLOCK_NAMES[kind]}.{part}"] = tensor_from_file(gguf, info)
            continue
        top = _TOP.match(info.name)
        if top and top.group(1) in VISION_TOP_NAMES:
            sd[f"{VISION_TOP_NAMES[top.group(1)]}.{top.group(2)}"] = tensor_from_file(gguf, info)
    for (block, part), parts in qkv.items():
        missing = [k for k in ("attn_q", "attn_k", "attn_v") if k not in parts]
        if missing:
            raise GGUFError(path, f"vision block {block} lacks {', '.join(f'v.blk.{block}.{k}.{part}' for k in missing)}")
        if len({logical_shape(parts[k])[1:] for k in parts}) != 1:
            raise GGUFError(path, f"vision block {block}: attn_q, attn_k and attn_v {part}s have different shapes")
        sd[f"visual.blocks.{block}.attn.qkv.{part}"] = cat_rows([parts[k] for k in ("attn_q", "attn_k", "attn_v")])
    # llama.cpp splits the temporal patch kernel [C, 3, 2, p, p] into two [C, 3, p, p] halves.
    if "v.patch_embd.weight.1" not in names:
        raise GGUFError(path, "not a Qwen2.5-VL mmproj: it lacks the second temporal patch kernel v.patch_embd.weight.1")
    halves = [dequantize(tensor_from_file(gguf, names[n]), torch.float32)
              for n in ("v.patch_embd.weight", "v.patch_embd.weight.1")]
    if halves[0].shape != halves[1].shape or halves[0].dim() != 4:
        raise GGUFError(path, f"the two temporal patch kernels differ in shape ({list(halves[0].shape)} and "
                              f"{list(halves[1].shape)}): damaged file")
    sd["visual.patch_embed.proj.weight"] = torch.stack(halves, dim=2)

    hidden = logical_shape(sd["visual.patch_embed.proj.weight"])[0]
    layers = _count(names, r"^v\.blk\.(\d+)\.")
    _check_block_count(gguf, "clip.vision.block_count", layers, "vision blocks")
    heads = _number(gguf, "clip.vision.attention.head_count", int, 16)
    # Every n_wa_pattern-th block attends to the whole image (Qwen2.5-VL's 8th of 32; a small model's
    # pattern may pass its block count): a value of thousands is damage.
    pattern = _number(gguf, "clip.vision.n_wa_pattern", int, 0, positive=False, at_most=1024)
    indexes = gguf.get("clip.vision.fullatt_block_indexes")
    if indexes is not None:
        if not (isinstance(indexes, np.ndarray) and indexes.dtype.kind in "iu"):
            raise GGUFError(path, "corrupt header: clip.vision.fullatt_block_indexes is not a list of integers")
        full = [int(i) for i in indexes]
    elif pattern > 0:
        full = [i for i in range(layers) if (i + 1) % pattern == 0]
    else:
        full = [i for i in (7, 15, 23, 31) if i < layers]
    patch = logical_shape(sd["visual.patch_embed.proj.weight"])[-1]
    vision = VisionConfig(
        hidden_size=hidden,
        intermediate_size=_shape_of(sd, "visual.blocks.0.mlp.up_proj.weight", path, 2)[0],
        num_heads=heads,
        num_layers=layers,
        patch_size=patch,
        output_hidden_size=projection,
        fullatt_block_indexes=full,
        spatial_merge_size=_number(gguf, "clip.vision.spatial_merge_size", int, 2),
    )
    if _number(gguf, "clip.vision.patch_size", int, patch) != patch:
        raise GGUFError(path, f"clip.vision.patch_size says {gguf.get('clip.vision.patch_size')} but the patch "
                              f"kernels are {patch} wide")
    if hidden % heads:
        raise GGUFError(path, f"vision width {hidden} is not divisible by its {heads} attention heads")
    check_tensors(path, sd, expected_vision_shapes(vision), f"Qwen2.5-VL vision tower of {layers} blocks")
    return vision, sd


def expected_vision_shapes(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor ComfyUI's Qwen2.5-VL vision tower of this config holds, with its shape."""
    h, inter, merged = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    out = {"visual.patch_embed.proj.weight": (h, 3, 2, v.patch_size, v.patch_size), "visual.merger.ln_q.weight": (h,),
           "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
           "visual.merger.mlp.2.weight": (v.output_hidden_size, merged),
           "visual.merger.mlp.2.bias": (v.output_hidden_size,)}
    for i in range(v.num_layers):
        b = f"visual.blocks.{i}."
        out.update({b + "norm1.weight": (h,), b + "norm2.weight": (h,), b + "attn.qkv.weight": (3 * h, h),
                    b + "attn.qkv.bias": (3 * h,), b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
                    b + "mlp.gate_proj.weight": (inter, h), b + "mlp.gate_proj.bias": (inter,),
                    b + "mlp.up_proj.weight": (inter, h), b + "mlp.up_proj.bias": (inter,),
                    b + "mlp.down_proj.weight": (h, inter), b + "mlp.down_proj.bias": (h,)})
    return out
