"""Writing state dicts as GGUF with the type mixes of real files (test fixtures and benchmarks)."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter, quants

from .reader import MAX_DIMS
from ..quant.formats import FORMATS
from .state_dict import ORIG_SHAPE_KEY

Recipe = Callable[[str, tuple[int, ...]], T]

_UNQUANTIZED = ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")
_Q6_SUFFIXES = (".to_v.weight", ".add_v_proj.weight", ".img_mlp.net.2.weight", ".txt_mlp.net.2.weight")


def _fits(qtype: T, shape: tuple[int, ...]) -> bool:
    return shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def city96_recipe(bulk: T, n_layers: int) -> Recipe:
    """city96's Qwen-Image recipe: small, 1-D and embedding tensors F32, the rest ``bulk`` (Q4_K_M for
    Q4_K: Q6_K on v projections and MLP outputs, Q5_K on the first and last block)."""
    edge = re.compile(rf"^transformer_blocks\.(0|{n_layers - 1})\.")

    def pick(name: str, shape: tuple[int, ...]) -> T:
        if len(shape) != 2 or int(np.prod(shape)) <= 1024 or name.startswith(_UNQUANTIZED):
            return T.F32
        qtype = bulk
        if bulk == T.Q4_K:
            if edge.match(name):
                qtype = T.Q5_K
            elif name.endswith(_Q6_SUFFIXES):
                qtype = T.Q6_K
        return qtype if _fits(qtype, shape) else T.F16
    return pick


def uniform_recipe(qtype: T) -> Recipe:
    """Every 2-D tensor of more than 1024 elements as ``qtype``; the rest F32."""
    def pick(name: str, shape: tuple[int, ...]) -> T:
        if len(shape) != 2 or int(np.prod(shape)) <= 1024 or not _fits(qtype, shape):
            return T.F32
        return qtype
    return pick


def encode(array: np.ndarray, qtype: T) -> np.ndarray:
    """A float array as the bytes (or float values) GGUFWriter stores for ``qtype``."""
    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    if qtype in FORMATS:
        return FORMATS[qtype].encode(array)
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)  # BF16


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], recipe: Recipe,
               arch: str | None = None, metadata: Mapping[str, Any] | None = None) -> dict[str, T]:
    """Write ``tensors`` (float arrays, torch order) to ``path``; returns the type chosen for each."""
    encoded, chosen, metadata = {}, {}, dict(metadata or {})
    for name, array in tensors.items():
        qtype = recipe(name, tuple(array.shape))
        if array.ndim > MAX_DIMS:
            # GGUF holds at most 4 dimensions: store it flattened with its shape, as ComfyUI-GGUF does.
            metadata[ORIG_SHAPE_KEY.format(name)] = [int(d) for d in array.shape]
            array = array.reshape(array.shape[0], -1)
        encoded[name] = (encode(array, qtype).reshape(*array.shape[:-1], -1), qtype)
        chosen[name] = qtype
    write_encoded(path, encoded, arch, metadata)
    return chosen


def write_encoded(path: str | os.PathLike, tensors: Mapping[str, tuple[np.ndarray, T]], arch: str | None = None,
                  metadata: Mapping[str, Any] | None = None) -> None:
    """Write tensors already in their GGUF encoding: (array, type), F32/F16 as float arrays, any other
    type as its bytes with the weight's leading axes and one run of blocks per row."""
    writer = GGUFWriter(os.fspath(path), arch=arch or "unknown")
    if arch is None:
        # sd.cpp conversions carry no architecture key; GGUFWriter always adds one, so drop it again.
        writer.kv_data[0].pop("general.architecture", None)
    for key, value in (metadata or {}).items():
        _add_metadata(writer, key, value)
    for name, (data, qtype) in tensors.items():
        if qtype in (T.F32, T.F16):
            writer.add_tensor(name, data)
        else:
            # GGUFWriter reads the element shape off the byte shape: every axis but the last is kept.
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
