"""llama.cpp text-encoder GGUFs (Qwen2.5-VL, Qwen2, Qwen3) and their mmproj vision files.

Tensor names are mapped to Hugging Face's (``model.layers.N.self_attn.q_proj``, ``visual.blocks.N``),
the names ComfyUI's text-encoder classes use; the model config comes from the file's metadata and
shapes, so any size loads. The two files are checked against each other when they are opened: an
mmproj whose projection width differs from the language model's hidden size is the cause of the
"mat1 and mat2 shapes cannot be multiplied" error other loaders end in, deep inside an edit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .errors import GGUFError
from .file_kind import TEXT_ENCODER_ARCHS, classify, wrong_kind_message
from .gguf_file import GGUFFile
from .state_dict import quant_summary, tensor_from_file
from .tensor import cat_rows, dequantize, logical_shape

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
LLM_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}

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
FAMILIES = {"qwen2vl": "qwen25vl", "qwen2": "qwen25vl", "qwen3": "qwen3"}


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
    tokenizer_gguf: GGUFFile = field(repr=False)
    summary: str = ""


def _llm_name(name: str) -> str | None:
    m = _BLOCK.match(name)
    if m and not m.group(1):
        kind = LLM_BLOCK_NAMES.get(m.group(3))
        return None if kind is None else f"model.layers.{m.group(2)}.{kind}.{m.group(4)}"
    m = _TOP.match(name)
    if m and m.group(1) in LLM_TOP_NAMES:
        return f"{LLM_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None  # output.weight (the LM head) and rope tables: not used by a text encoder


def _count(names, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for n in names if (m := rx.match(n))})


def _rope_sections(gguf: GGUFFile, arch: str, head_dim: int) -> list[int]:
    """M-RoPE sections (time, height, width) in rotary pairs: they cover half the head."""
    sections = gguf.get(f"{arch}.rope.dimension_sections")
    if sections is not None:
        sections = [int(s) for s in sections if int(s) > 0]
        if sum(sections) == head_dim // 2:
            return sections
    # Qwen2.5-VL's split ([16, 24, 24] for 128-wide heads) scaled to the head size.
    first = head_dim // 8
    rest = head_dim // 2 - first
    return [first, rest // 2, rest - rest // 2]


def llm_config(gguf: GGUFFile, sd: dict) -> dict:
    arch = gguf.architecture
    vocab, hidden = logical_shape(sd["model.embed_tokens.weight"])
    heads = int(gguf.get(f"{arch}.attention.head_count", 0)) or None
    q_rows = logical_shape(sd["model.layers.0.self_attn.q_proj.weight"])[0]
    k_rows = logical_shape(sd["model.layers.0.self_attn.k_proj.weight"])[0]
    head_dim = int(gguf.get(f"{arch}.attention.key_length", 0)) or (q_rows // heads if heads else 128)
    heads = heads or q_rows // head_dim
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": logical_shape(sd["model.layers.0.mlp.up_proj.weight"])[0],
        "num_hidden_layers": _count(sd, r"^model\.layers\.(\d+)\."),
        "num_attention_heads": heads,
        "num_key_value_heads": k_rows // head_dim,
        "head_dim": head_dim,
        "rms_norm_eps": float(gguf.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(gguf.get(f"{arch}.rope.freq_base", 1e6)),
        "qkv_bias": "model.layers.0.self_attn.q_proj.bias" in sd,
        "qk_norm": "model.layers.0.self_attn.q_norm.weight" in sd,
    }
    if FAMILIES[arch] == "qwen25vl":
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
    vision = None
    summary = quant_summary(gguf)
    if mmproj_path:
        vision, vision_sd = open_mmproj(mmproj_path, llm_path, config["hidden_size"])
        sd.update(vision_sd)
    return TextEncoder(llm_path, mmproj_path, FAMILIES[arch], config, vision, sd, gguf, summary)


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
        tensor = None
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
        sd[f"visual.blocks.{block}.attn.qkv.{part}"] = cat_rows([parts[k] for k in ("attn_q", "attn_k", "attn_v")])
    # llama.cpp splits the temporal patch kernel [C, 3, 2, p, p] into two [C, 3, p, p] halves.
    if "v.patch_embd.weight.1" not in names:
        raise GGUFError(path, "not a Qwen2.5-VL mmproj: it lacks the second temporal patch kernel v.patch_embd.weight.1")
    halves = [dequantize(tensor_from_file(gguf, names[n]), torch.float32)
              for n in ("v.patch_embd.weight", "v.patch_embd.weight.1")]
    sd["visual.patch_embed.proj.weight"] = torch.stack(halves, dim=2)

    hidden = logical_shape(sd["visual.patch_embed.proj.weight"])[0]
    layers = _count(names, r"^v\.blk\.(\d+)\.")
    heads = int(gguf.get("clip.vision.attention.head_count", 16))
    pattern = int(gguf.get("clip.vision.n_wa_pattern", 0) or 0)
    if gguf.get("clip.vision.fullatt_block_indexes") is not None:
        full = [int(i) for i in gguf.get("clip.vision.fullatt_block_indexes")]
    elif pattern:
        full = [i for i in range(layers) if (i + 1) % pattern == 0]
    else:
        full = [i for i in (7, 15, 23, 31) if i < layers]
    vision = VisionConfig(
        hidden_size=hidden,
        intermediate_size=logical_shape(sd["visual.blocks.0.mlp.up_proj.weight"])[0],
        num_heads=heads,
        num_layers=layers,
        patch_size=int(gguf.get("clip.vision.patch_size", logical_shape(sd["visual.patch_embed.proj.weight"])[-1])),
        output_hidden_size=projection,
        fullatt_block_indexes=full,
        spatial_merge_size=int(gguf.get("clip.vision.spatial_merge_size", 2) or 2),
    )
    if hidden % heads:
        raise GGUFError(path, f"vision width {hidden} is not divisible by its {heads} attention heads")
    return vision, sd
