"""Holding some quantized weights dequantized: which ones fit a memory budget, and converting them
(or requantizing them to FP8 rows for the fp8 mode).

A weight held in the compute dtype runs at native speed (no per-step dequantization) but takes
2 bytes per element instead of the 0.5-1 of its blocks. Given a budget for the whole model, the
smallest weights are converted first: each quantized weight costs about the same per-step overhead
whatever its size, so the small ones buy the most speed per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import FP8_ROWS, quantize_rows
from .tensor import GGMLTensor, dequantize, logical_shape, wrap


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class CachePlan:
    keys: tuple[str, ...]   # the quantized weights to hold dequantized
    quantized: int          # how many quantized weights there are
    model_bytes: int        # the whole model's size once converted
    cached_bytes: int       # of which the converted weights

    def describe(self) -> str:
        return (f"{len(self.keys)} of {self.quantized} quantized weights held dequantized "
                f"({self.cached_bytes / 2**30:.1f} GiB), model {self.model_bytes / 2**30:.1f} GiB")


def plan_cache(state_dict: dict[str, torch.Tensor], budget: int, dtype: torch.dtype,
               max_cached: int | None = None) -> CachePlan:
    """The quantized weights to convert to ``dtype`` so that the model's size stays within ``budget``
    bytes and the converted copies within ``max_cached`` bytes."""
    quantized = [(k, t) for k, t in state_dict.items() if isinstance(t, GGMLTensor)]
    total = sum(nbytes(t) for t in state_dict.values())
    keys, cached = [], 0
    for key, t in sorted(quantized, key=lambda kt: nbytes(kt[1])):
        converted = logical_shape(t).numel() * dtype.itemsize
        if total - nbytes(t) + converted > budget or (max_cached is not None and cached + converted > max_cached):
            continue
        total += converted - nbytes(t)
        cached += converted
        keys.append(key)
    return CachePlan(tuple(keys), len(quantized), total, cached)


def convert(state_dict: dict[str, torch.Tensor], keys, dtype: torch.dtype,
            work_device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with ``keys`` dequantized to ``dtype`` (computed on ``work_device``,
    a GPU being much faster, and kept on the CPU like the rest of the file's tensors)."""
    out = dict(state_dict)
    for key in keys:
        t = state_dict[key]
        out[key] = dequantize(t.to(work_device), dtype).to("cpu")
    return out


def to_fp8(state_dict: dict[str, torch.Tensor], keys, work_device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with the 2-D weights ``keys`` (quantized or float) requantized to FP8
    rows, computed on ``work_device`` and kept on the CPU."""
    out = dict(state_dict)
    for key in keys:
        t = state_dict[key]
        shape = logical_shape(t)
        out[key] = wrap(quantize_rows(dequantize(t.to(work_device), torch.float32)).to("cpu"), FP8_ROWS, shape)
    return out
