"""Which GGUF type each tensor of a converted model gets: the named levels users download, as
city96's files mix them for the diffusion models and as llama.cpp's ``llama-quantize`` mixes them
for the text encoders, with llama.cpp's fallback for a row length a type cannot take (for both:
city96's patched llama-quantize writes F16 there instead, which no Qwen-Image shape needs).

The diffusion-model mixes reproduce the byte sizes of city96/Qwen-Image-gguf's Q2_K, Q3_K_S,
Q3_K_M and Q4_K_M files from the model's shapes (``tests/unit/test_convert.py``). The language-model
rules are llama.cpp's ``llama_tensor_get_type`` for these levels, for models without experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

Recipe = Callable[[str, tuple[int, ...]], T]

# At or below this many elements a tensor stays F32: too small for blocks to pay.
SMALL = 1024
# llama.cpp's ``tensor_type_fallback``: the type a row length the wanted one cannot take gets.
FALLBACK = {T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


@dataclass(frozen=True)
class Level:
    """A named output type: the bulk type and, for the diffusion models, the city96 mix."""
    name: str
    bulk: T
    file_type: F
    sensitive: T | None = None  # value projections and MLP output projections (the _M mixes)
    value: T | None = None      # value projections alone
    edges: T | None = None      # the first and the last block


LEVELS = {level.name: level for level in (
    Level("Q8_0", T.Q8_0, F.MOSTLY_Q8_0),
    Level("Q6_K", T.Q6_K, F.MOSTLY_Q6_K),
    Level("Q5_K_M", T.Q5_K, F.MOSTLY_Q5_K_M, sensitive=T.Q6_K, edges=T.Q6_K),
    Level("Q5_K_S", T.Q5_K, F.MOSTLY_Q5_K_S, edges=T.Q6_K),
    Level("Q5_1", T.Q5_1, F.MOSTLY_Q5_1),
    Level("Q5_0", T.Q5_0, F.MOSTLY_Q5_0),
    Level("Q4_K_M", T.Q4_K, F.MOSTLY_Q4_K_M, sensitive=T.Q6_K, edges=T.Q5_K),
    Level("Q4_K_S", T.Q4_K, F.MOSTLY_Q4_K_S, edges=T.Q5_K),
    Level("Q4_1", T.Q4_1, F.MOSTLY_Q4_1),
    Level("Q4_0", T.Q4_0, F.MOSTLY_Q4_0),
    Level("IQ4_XS", T.IQ4_XS, F.MOSTLY_IQ4_XS),
    Level("IQ4_NL", T.IQ4_NL, F.MOSTLY_IQ4_NL),
    Level("Q3_K_M", T.Q3_K, F.MOSTLY_Q3_K_M, sensitive=T.Q4_K, edges=T.Q4_K),
    Level("Q3_K_S", T.Q3_K, F.MOSTLY_Q3_K_S, edges=T.Q4_K),
    # city96's Q2_K raises only the value projections (llama.cpp's attn_v rule for few KV groups).
    Level("Q2_K", T.Q2_K, F.MOSTLY_Q2_K, value=T.Q3_K, edges=T.Q4_K),
    Level("BF16", T.BF16, F.MOSTLY_BF16),
    Level("F16", T.F16, F.MOSTLY_F16),
)}


def block_size(qtype: T) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fitted(qtype: T, shape: tuple[int, ...]) -> T:
    """``qtype``, or llama.cpp's fallback where the row length is not a whole number of its blocks."""
    row = shape[-1]
    if row % block_size(qtype) == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if row % block_size(qtype) == 0 else T.F16


def _kept_float(shape: tuple[int, ...]) -> bool:
    return len(shape) != 2 or int(np.prod(shape)) <= SMALL


@dataclass(frozen=True)
class ImageArch:
    """Where a diffusion architecture's mix differs: its block prefix, the tensors city96 keeps in
    16 bits (the input and output projections, the timestep and text embedders) and the ones the _M
    mixes raise."""
    name: str  # general.architecture, as city96's loader reads it
    block: re.Pattern
    unquantized: tuple[str, ...]
    sensitive: tuple[str, ...]
    value: tuple[str, ...]  # the value projections


IMAGE_ARCHS = {arch.name: arch for arch in (
    ImageArch("qwen_image", re.compile(r"^transformer_blocks\.(\d+)\."),
              ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out."),
              (".to_v.weight", ".add_v_proj.weight", ".img_mlp.net.2.weight", ".txt_mlp.net.2.weight"),
              (".to_v.weight", ".add_v_proj.weight")),
    # Z-Image's value projection is fused into attention.qkv: only the MLP output is raised.
    ImageArch("lumina2", re.compile(r"^layers\.(\d+)\."),
              ("x_embedder.", "t_embedder.", "cap_embedder.", "final_layer.", "x_pad_token", "cap_pad_token"),
              (".feed_forward.w2.weight",), ()),
)}


def image_recipe(level: Level, arch: ImageArch, n_layers: int, half: T = T.F16) -> Recipe:
    """city96's mix of ``level`` for a diffusion model of ``n_layers`` blocks; ``half`` is the 16-bit
    type of the tensors kept unquantized (BF16 for a bf16 checkpoint, so no value overflows)."""
    def pick(name: str, shape: tuple[int, ...]) -> T:
        if _kept_float(shape):
            return T.F32
        if level.bulk in (T.F16, T.BF16):
            return level.bulk
        if name.startswith(arch.unquantized):
            return half
        block = arch.block.match(name)
        qtype = level.bulk
        if block and level.edges and int(block.group(1)) in (0, n_layers - 1):
            qtype = level.edges
        elif level.sensitive and name.endswith(arch.sensitive):
            qtype = level.sensitive
        elif level.value and name.endswith(arch.value):
            qtype = level.value
        return fitted(qtype, shape)
    return pick


def uniform_recipe(qtype: T) -> Recipe:
    """Every 2-D tensor of more than ``SMALL`` elements as ``qtype`` (F32 where its rows do not fit);
    the rest F32. For test fixtures of one type."""
    def pick(name: str, shape: tuple[int, ...]) -> T:
        if _kept_float(shape) or shape[-1] % block_size(qtype):
            return T.F32
        return qtype
    return pick


def float_recipe(half: T) -> Recipe:
    """Every tensor of two or more dimensions as ``half`` (F16 or BF16), the rest F32: llama.cpp's
    mmproj files."""
    return lambda name, shape: T.F32 if len(shape) < 2 else half


_LAYER = re.compile(r"^blk\.(\d+)\.")


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _llm_rule(level: str, name: str, i: int, n: int, gqa: int, bulk: T) -> T:
    """llama.cpp's per-category choice (``llama_tensor_get_type_impl``) for one block tensor."""
    if name.endswith("attn_v.weight"):
        rules = {"Q2_K": T.Q4_K if gqa >= 4 else T.Q3_K,
                 "Q3_K_M": T.Q5_K if i < 2 else T.Q4_K,
                 "IQ4_NL": T.Q5_K if gqa >= 4 else bulk, "IQ4_XS": T.Q5_K if gqa >= 4 else bulk,
                 "Q4_K_M": T.Q6_K if _more_bits(i, n) else bulk, "Q5_K_M": T.Q6_K if _more_bits(i, n) else bulk,
                 "Q4_K_S": T.Q5_K if i < 4 else bulk}
    elif name.endswith("ffn_down.weight"):
        rules = {"Q2_K": T.Q3_K,
                 "Q3_K_M": T.Q5_K if i < n // 16 else T.Q4_K,
                 "Q4_K_M": T.Q6_K if _more_bits(i, n) else bulk,
                 "IQ4_NL": T.Q5_K if i < n // 8 else bulk, "IQ4_XS": T.Q5_K if i < n // 8 else bulk,
                 "Q5_K_M": T.Q6_K if _more_bits(i, n) else bulk,
                 "Q4_K_S": T.Q5_K if i < n // 8 else bulk}
    elif name.endswith("attn_output.weight"):
        rules = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K}
    else:
        rules = {}
    return rules.get(level, bulk)


def llm_recipe(level: Level, n_layers: int, gqa: int, tied: bool) -> Recipe:
    """llama.cpp's mix of ``level`` for a language model in llama.cpp's names: ``gqa`` query heads per
    KV head; ``tied`` when the token table is also the output head."""
    def pick(name: str, shape: tuple[int, ...]) -> T:
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            return T.F32
        bulk = level.bulk
        if bulk in (T.F16, T.BF16):
            return bulk
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            qtype = T.Q8_0 if shape[-1] % block_size(bulk) else bulk if bulk == T.Q8_0 else T.Q6_K
        else:
            layer = _LAYER.match(name)
            qtype = _llm_rule(level.name, name, int(layer.group(1)), n_layers, gqa, bulk) if layer else bulk
        return fitted(qtype, shape)
    return pick
