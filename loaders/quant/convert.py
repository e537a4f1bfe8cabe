"""Converting a state dict's weights at load: requantizing them to FP8 rows, for the fp8 mode on
devices that cannot hold the converted copies next to the bytes (see ``plan.DeviceCopies``)."""

from __future__ import annotations

import torch

from .fp8 import FP8Rows
from .weight import dequantize, logical_shape, wrap


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def to_fp8(state_dict: dict[str, torch.Tensor], keys, work_device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with the 2-D weights ``keys`` (quantized or float) requantized to FP8
    rows, computed on ``work_device`` and kept on the CPU."""
    out = dict(state_dict)
    for key in keys:
        t = state_dict[key]
        out[key] = wrap(FP8Rows.encode(dequantize(t.to(work_device), torch.float32)).to("cpu"), FP8Rows,
                        logical_shape(t))
    return out
