"""Quantizing activations to fp8 e4m3 for the fp8 matmul, in one Triton kernel: per row, the largest
magnitude, then the scaled values, the row read twice (the second time from L2) and written once
in fp8, where the equivalent torch ops write and re-read bf16 temporaries three times."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import FP8, FP8_MAX, MIN_AMAX

_BLOCK = 1024


@triton.jit
def _quantize_kernel(x, q, scale, K, stride_x, PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
                     FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = x + row * stride_x
    dst = q + row * K
    cols = tl.arange(0, BLOCK)
    if PER_ROW:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            v = tl.load(src + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        s = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / FP8_MAX
        tl.store(scale + row, s)
    else:
        s = tl.load(scale)
    inv = 1.0 / s
    for k in range(0, K, BLOCK):
        v = tl.load(src + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(v * inv, -FP8_MAX), FP8_MAX)
        tl.store(dst + k + cols, v.to(dst.dtype.element_ty), mask=k + cols < K)


def quantize_activations(x: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ([M, K], CUDA) as fp8 values and their fp32 scales: one per row, or one for the whole
    tensor (``per_row`` False, for GPUs whose fp8 matmul takes no row scales)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    if per_row:
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
    else:
        scale = (x.abs().amax().float().clamp(min=MIN_AMAX) / FP8_MAX).reshape(())
    if m:
        _quantize_kernel[(m,)](x, q, scale, k, x.stride(0), PER_ROW=per_row, BLOCK=_BLOCK, FP8_MAX=FP8_MAX,
                              MIN_AMAX=MIN_AMAX)
    return q, scale
