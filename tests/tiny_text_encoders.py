"""Tiny random Qwen2.5-VL (text model + vision tower) and Qwen3 text encoders, written the way
llama.cpp writes them (blk.N names, an mmproj file with split patch kernels and split q/k/v), each
with a Hugging Face-named float32 safetensors twin holding exactly the values the GGUFs decode to.

The tokenizer metadata is written from a Hugging Face tokenizer folder (vocab.json, merges.txt,
tokenizer_config.json) as llama.cpp's converter writes it: tokens in id order padded to the
vocabulary size, token types, and merges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

from loaders.convert.recipes import LEVELS, llm_recipe, uniform_recipe
from loaders.gguf.writer import write_gguf
from loaders.models.tokenizer import gguf_tokenizer_metadata
from tiny_models import decoded, random_weights

QWEN25VL = dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=152064)
QWEN3 = dict(hidden=256, layers=3, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=151936)
VISION = dict(hidden=128, layers=2, heads=2, intermediate=256, patch=14)

# Hugging Face block names -> llama.cpp's, as llama.cpp's converter writes them.
HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_attention_layernorm": "ffn_norm",
}
HF_TO_GGUF_VISION = {"attn.proj": "attn_out", "norm1": "ln1", "norm2": "ln2", "mlp.gate_proj": "ffn_gate",
                     "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llm_shapes(hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, qk_norm=False, bias=True,
               head=False) -> dict:
    s = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if head:  # an untied output head, as Qwen2.5-VL-7B has
        s["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        b = f"model.layers.{i}."
        s[b + "input_layernorm.weight"] = s[b + "post_attention_layernorm.weight"] = (hidden,)
        for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)):
            s[f"{b}self_attn.{proj}.weight"] = (rows, hidden)
            if bias:
                s[f"{b}self_attn.{proj}.bias"] = (rows,)
        s[b + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if qk_norm:
            s[b + "self_attn.q_norm.weight"] = s[b + "self_attn.k_norm.weight"] = (head_dim,)
        s[b + "mlp.gate_proj.weight"] = s[b + "mlp.up_proj.weight"] = (intermediate, hidden)
        s[b + "mlp.down_proj.weight"] = (hidden, intermediate)
    return s


def vision_shapes(hidden, layers, heads, intermediate, patch, out) -> dict:
    s = {"visual.patch_embed.proj.weight": (hidden, 3, 2, patch, patch), "visual.merger.ln_q.weight": (hidden,),
         "visual.merger.mlp.0.weight": (4 * hidden, 4 * hidden), "visual.merger.mlp.0.bias": (4 * hidden,),
         "visual.merger.mlp.2.weight": (out, 4 * hidden), "visual.merger.mlp.2.bias": (out,)}
    for i in range(layers):
        b = f"visual.blocks.{i}."
        s[b + "norm1.weight"] = s[b + "norm2.weight"] = (hidden,)
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = (3 * hidden, hidden), (3 * hidden,)
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = (hidden, hidden), (hidden,)
        for proj, shape in (("gate_proj", (intermediate, hidden)), ("up_proj", (intermediate, hidden)),
                            ("down_proj", (hidden, intermediate))):
            s[f"{b}mlp.{proj}.weight"], s[f"{b}mlp.{proj}.bias"] = shape, (shape[0],)
    return s


def to_gguf_llm(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = value
        elif key == "model.norm.weight":
            out["output_norm.weight"] = value
        elif key == "lm_head.weight":
            out["output.weight"] = value
        else:
            _, _, layer, rest = key.split(".", 3)
            name, part = rest.rsplit(".", 1)
            out[f"blk.{layer}.{HF_TO_GGUF_BLOCK[name]}.{part}"] = value
    return out


def to_gguf_mmproj(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        if key == "visual.patch_embed.proj.weight":
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = value[:, :, 0], value[:, :, 1]
        elif key.startswith("visual.merger."):
            out[{"ln_q": "v.post_ln", "mlp.0": "mm.0", "mlp.2": "mm.2"}[key[14:].rsplit(".", 1)[0]]
                + "." + key.rsplit(".", 1)[1]] = value
        else:
            _, _, layer, rest = key.split(".", 3)
            name, part = rest.rsplit(".", 1)
            if name == "attn.qkv":
                for piece, chunk in zip(("attn_q", "attn_k", "attn_v"), np.split(value, 3)):
                    out[f"v.blk.{layer}.{piece}.{part}"] = chunk
            else:
                out[f"v.blk.{layer}.{HF_TO_GGUF_VISION[name]}.{part}"] = value
    return out


def q4_k_m(spec: dict, tied: bool):
    """llama.cpp's Q4_K_M mix for a language model of ``spec``."""
    return llm_recipe(LEVELS["Q4_K_M"], spec["layers"], spec["heads"] // spec["kv_heads"], tied)


def byte_level_tokenizer(words: list[str], specials: list[tuple[str, int]], pre: str = "qwen2",
                         vocab_size: int | None = None) -> dict:
    """tokenizer.ggml.* of a small byte-level BPE, as llama.cpp writes one: GPT-2's 256 byte symbols,
    each of ``words`` made by one merge of its longest known prefix, ``specials`` (text, llama.cpp token
    type), then unused padding up to ``vocab_size``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    tokens = [chr(b) if b in printable else chr(next(others)) for b in range(256)]
    merges = []
    for word in words:
        left = max((t for t in tokens if word.startswith(t) and t != word), key=len)
        merges.append(f"{left} {word[len(left):]}")
        tokens.append(word)
    types = [1] * len(tokens) + [kind for _, kind in specials]
    tokens += [text for text, _ in specials]
    padding = max(0, (vocab_size or 0) - len(tokens))
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(padding)]
    types += [5] * padding
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def write_llm(path: Path, arch: str, spec: dict, tokenizer: Path | None, twin: Path | None, seed: int = 2,
              metadata: dict | None = None, drop: tuple[str, ...] = (), head: bool = False) -> dict:
    weights = random_weights(llm_shapes(**spec, qk_norm=arch == "qwen3", bias=arch != "qwen3", head=head), seed)
    gguf_weights = to_gguf_llm(weights)
    meta = {f"{arch}.block_count": spec["layers"], f"{arch}.embedding_length": spec["hidden"],
            f"{arch}.feed_forward_length": spec["intermediate"], f"{arch}.attention.head_count": spec["heads"],
            f"{arch}.attention.head_count_kv": spec["kv_heads"], f"{arch}.rope.freq_base": 1000000.0,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.context_length": 128000}
    if arch == "qwen2vl":
        meta["qwen2vl.rope.dimension_sections"] = [8, 12, 12, 0]
    if arch == "qwen3":
        meta["qwen3.attention.key_length"] = spec["head_dim"]
    if tokenizer is not None:
        meta.update(gguf_tokenizer_metadata(tokenizer, spec["vocab"]))
    meta.update(metadata or {})
    gguf_weights = {k: v for k, v in gguf_weights.items() if k not in drop}
    chosen = write_gguf(path, gguf_weights, q4_k_m(spec, tied=not head), arch=arch, metadata=meta)
    if twin is not None:
        values = decoded(gguf_weights, chosen)
        hf = dict(zip(weights, (values[k] for k in gguf_weights)))
        save_file(hf, str(twin))
    return chosen


def write_mmproj(path: Path, spec: dict, out_width: int, twin: Path | None, qtype: T = T.F16, seed: int = 3,
                 old_metadata: bool = False, metadata: dict | None = None) -> None:
    weights = random_weights(vision_shapes(**spec, out=out_width), seed)
    gguf_weights = to_gguf_mmproj(weights)
    meta = {"clip.has_vision_encoder": True, "clip.projector_type": "qwen2.5vl_merger", "clip.use_silu": True,
            "clip.vision.image_size": 560, "clip.vision.patch_size": spec["patch"],
            "clip.vision.embedding_length": spec["hidden"], "clip.vision.feed_forward_length": spec["intermediate"],
            "clip.vision.projection_dim": out_width, "clip.vision.block_count": spec["layers"],
            "clip.vision.attention.head_count": spec["heads"], "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.image_mean": [0.48145466, 0.4578275, 0.40821073],
            "clip.vision.image_std": [0.26862954, 0.26130258, 0.27577711]}
    if old_metadata:
        meta["clip.vision.fullatt_block_indexes"] = [1]
    else:
        meta["general.type"] = "mmproj"
        meta["clip.vision.n_wa_pattern"] = 2
    meta.update(metadata or {})
    recipe = uniform_recipe(qtype) if qtype not in (T.F16,) else (lambda n, s: T.F32 if len(s) == 1 else T.F16)
    chosen = write_gguf(path, gguf_weights, recipe, arch="clip", metadata=meta)
    if twin is not None:
        values = decoded(gguf_weights, chosen)
        hf = {}
        for key in weights:
            if key == "visual.patch_embed.proj.weight":
                hf[key] = np.stack([values["v.patch_embd.weight"], values["v.patch_embd.weight.1"]], axis=2)
            elif key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
                layer, part = key.split(".")[2], key.rsplit(".", 1)[1]
                hf[key] = np.concatenate([values[f"v.blk.{layer}.attn_{p}.{part}"] for p in "qkv"])
            else:
                hf[key] = values[to_gguf_mmproj({key: weights[key]}).popitem()[0]]
        save_file(hf, str(twin))
