"""Finding weights that hold NaN or inf, to name the damaged tensor when a model's output is not finite."""

from __future__ import annotations

from typing import Iterable

import torch

from .tensor import GGMLTensor, dequantize


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors whose values (dequantized where quantized) are not all finite."""
    bad = []
    for name, tensor in named:
        if isinstance(tensor, GGMLTensor) or tensor.is_floating_point():
            if not torch.isfinite(dequantize(tensor, torch.float32)).all():
                bad.append(name)
    return bad
