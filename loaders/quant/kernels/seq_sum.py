"""Sums over the last axis accumulated left to right in float32, in one Triton kernel: the encoders'
sums must round as llama.cpp's C loops do (see ``loaders.quant.encode``), which no torch reduction
promises, and in torch ops they take one launch per term (hundreds per tensor on a GPU). Each
program sums whole rows in registers, adding the terms one at a time: only float32 adds, which
Triton rounds one by one (there is no product to fuse into a multiply-add)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_ROWS = 512  # rows per program


@triton.jit
def _seq_sum_kernel(terms, out, rows, N: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    first = terms + row * N
    total = tl.load(first, mask=live, other=0.0)
    for i in tl.static_range(1, N):
        total += tl.load(first + i, mask=live, other=0.0)
    tl.store(out + row, total, mask=live)


def seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """The float32 ``terms`` (on a CUDA device, or under Triton's interpreter) summed over the last
    axis in order."""
    if terms.shape[-1] == 0:
        raise ValueError("no terms to sum")
    terms = terms.contiguous()
    out = torch.empty(terms.shape[:-1], dtype=torch.float32, device=terms.device)
    rows = out.numel()
    if rows:
        # Triton launches on the current device: the tensors' own (a model may sit on another GPU).
        with torch.cuda.device(terms.device) if terms.is_cuda else contextlib.nullcontext():
            _seq_sum_kernel[(triton.cdiv(rows, _ROWS),)](terms, out, rows, N=terms.shape[-1], ROWS=_ROWS)
    return out
