"""Finding damaged weights, to name them when a model's output is not finite."""

from __future__ import annotations

from typing import Iterable

import torch

from .weight import GGMLTensor, dequantize

# Trained weights stay orders of magnitude below this; a flipped exponent bit lands far above it
# (and then overflows activations even in fp32). Consulted only once an output is already not finite.
ABSURD = 1e4


def damage_report(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """For an error message: which weights are damaged, or None where none is."""
    bad = damaged_tensors(named)
    if not bad:
        return None
    return f"the file holds NaN, inf or absurdly large weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"


def damaged_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors whose values (dequantized where quantized) hold NaN, inf or absurdly
    large values."""
    bad = []
    for name, tensor in named:
        if isinstance(tensor, GGMLTensor) or tensor.is_floating_point():
            values = dequantize(tensor, torch.float32)
            if values.numel() and not (torch.isfinite(values).all() and values.abs().max() < ABSURD):
                bad.append(name)
    return bad
