"""Writing GGUF files tensor by tensor: each tensor is encoded when its turn comes and written at
once, so writing holds one tensor in memory whatever the model's size (the converter, test fixtures
and benchmarks all write through here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter, quants
from gguf.quants import quant_shape_from_byte_shape

from ..quant.formats import FORMATS
from .reader import MAX_DIMS
from .state_dict import ORIG_SHAPE_KEY

Recipe = Callable[[str, tuple[int, ...]], T]


@dataclass(frozen=True)
class Planned:
    """One tensor of a file to write: its name, shape as stored (torch order) and type."""
    name: str
    shape: tuple[int, ...]
    qtype: T

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


def stored_shape(name: str, shape: tuple[int, ...], metadata: dict[str, Any]) -> tuple[int, ...]:
    """The shape a tensor is stored with: GGUF holds at most 4 dimensions, so a larger one is stored
    flattened with its shape in ``metadata``, as ComfyUI-GGUF does."""
    if len(shape) <= MAX_DIMS:
        return shape
    metadata[ORIG_SHAPE_KEY.format(name)] = [int(d) for d in shape]
    return (shape[0], int(np.prod(shape[1:])))


def encode(array: np.ndarray, qtype: T, device: str | None = None, importance: np.ndarray | None = None
           ) -> np.ndarray:
    """A float array as what GGUFWriter stores for ``qtype``: F32/F16 values, or the blocks' bytes
    with the array's leading axes and one run of blocks per row (a block type's computed on
    ``device`` when one is given: the same bytes; searched with ``importance``, an importance
    matrix's values for the row, where the type weighs one)."""
    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
    if qtype in FORMATS:
        data = FORMATS[qtype].encode(torch.from_numpy(rows).to(device) if device else rows, importance)
        data = data.cpu().numpy() if isinstance(data, torch.Tensor) else data
    else:  # BF16
        data = quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)
    return data.reshape(*array.shape[:-1], -1)


def write_tensors(path: str | os.PathLike, plan: Iterable[Planned], produce: Callable[[Planned], np.ndarray],
                  arch: str | None = None, metadata: Mapping[str, Any] | None = None,
                  done: Callable[[Planned], None] = lambda p: None) -> None:
    """Write the tensors of ``plan`` to ``path`` in order, ``produce(p)`` giving each one's stored
    form (``encode``'s) only when it is written; ``done(p)`` after each."""
    plan = list(plan)
    writer = GGUFWriter(os.fspath(path), arch=arch or "unknown")
    try:
        if arch is None:
            # sd.cpp conversions carry no architecture key; GGUFWriter always adds one, so drop it again.
            writer.kv_data[0].pop("general.architecture", None)
        for key, value in (metadata or {}).items():
            add_metadata(writer, key, value)
        for p in plan:
            # A shape that is not uint8 is taken as the element shape (no byte-shape conversion).
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float16 if p.qtype == T.F16 else np.float32),
                                   p.nbytes, raw_dtype=None if p.qtype in (T.F32, T.F16) else p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:
            data = produce(p)
            if data.nbytes != p.nbytes:
                raise ValueError(f"{p.name}: {data.nbytes} bytes produced for {p.nbytes} planned ({p.qtype.name})")
            writer.write_tensor_data(data)
            done(p)
    finally:
        writer.close()


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], recipe: Recipe,
               arch: str | None = None, metadata: Mapping[str, Any] | None = None) -> dict[str, T]:
    """Write ``tensors`` (float arrays, torch order) to ``path``; returns the type chosen for each."""
    metadata = dict(metadata or {})
    plan = [Planned(name, stored_shape(name, a.shape, metadata), recipe(name, tuple(a.shape)))
            for name, a in tensors.items()]
    write_tensors(path, plan, lambda p: encode(tensors[p.name].reshape(p.shape), p.qtype), arch, metadata)
    return {p.name: p.qtype for p in plan}


def write_encoded(path: str | os.PathLike, tensors: Mapping[str, tuple[np.ndarray, T]], arch: str | None = None,
                  metadata: Mapping[str, Any] | None = None) -> None:
    """Write tensors already in their stored form (``encode``'s), as (array, type)."""
    plan = [Planned(name, tuple(data.shape if qtype in (T.F32, T.F16) else quant_shape_from_byte_shape(data.shape, qtype)),
                    qtype) for name, (data, qtype) in tensors.items()]
    write_tensors(path, plan, lambda p: tensors[p.name][0], arch, metadata)


def add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
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
