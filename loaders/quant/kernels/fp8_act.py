"""Quantizing activations to fp8 e4m3 for the fp8 matmul, in one Triton kernel: per row, the largest
magnitude, then the scaled values, written once in fp8, where the equivalent torch ops write and
re-read bf16 temporaries three times. Rows up to ``ONE_PASS_MAX`` wide are read once and held in
registers; wider ones are read twice (the second time mostly from L2)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..fp8 import FP8, FP8_MAX, MIN_AMAX
from .launch import Launcher, int_key

# Qwen-Image's widest activations (its MLP's 12288) take one pass; Qwen2.5-VL's MLP (18944) takes two.
ONE_PASS_MAX = 16384
_BLOCK = 2048

# The kernel's constants, as globals rather than launch arguments.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _quantize_kernel(x, q, scale, K, stride_x, PER_ROW: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = x + row * stride_x
    dst = q + row * K
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        v = tl.load(src + cols, mask=cols < K, other=0.0).to(tl.float32)
        if PER_ROW:
            s = tl.maximum(tl.max(tl.abs(v), axis=0), _MIN_AMAX) / _FP8_MAX
            tl.store(scale + row, s)
        else:
            s = tl.load(scale)
        v = tl.minimum(tl.maximum(v * (1.0 / s), -_FP8_MAX), _FP8_MAX)
        tl.store(dst + cols, v.to(dst.dtype.element_ty), mask=cols < K)
    else:
        if PER_ROW:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for k in range(0, K, BLOCK):
                v = tl.load(src + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            s = tl.maximum(tl.max(amax, axis=0), _MIN_AMAX) / _FP8_MAX
            tl.store(scale + row, s)
        else:
            s = tl.load(scale)
        inv = 1.0 / s
        for k in range(0, K, BLOCK):
            v = tl.load(src + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(v * inv, -_FP8_MAX), _FP8_MAX)
            tl.store(dst + k + cols, v.to(dst.dtype.element_ty), mask=k + cols < K)


def quantize_activations(x: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ([M, K], CUDA) as fp8 values and their fp32 scales: ``[M, 1]``, one per row, or one for
    the whole tensor (``per_row`` False, for GPUs whose fp8 matmul takes no row scales)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    device = x.device
    q = torch.empty((m, k), dtype=FP8, device=device)
    if per_row:
        scale = torch.empty((m, 1), dtype=torch.float32, device=device)
    else:
        scale = (x.abs().amax().float().clamp(min=MIN_AMAX) / FP8_MAX).reshape(())
    if m:
        launch, stride = _launcher(k, per_row), x.stride(0)
        if torch.compiler.is_compiling():
            launch((m, 1, 1), x, q, scale, k, stride)
        else:
            # q and scale are fresh allocations (aligned), k is the launcher's own: what varies is x.
            launch.keyed((x.dtype, x.data_ptr() % 16 == 0, int_key(stride), x.get_device()), (m, 1, 1),
                         x, q, scale, k, stride)
    return q, scale


@functools.lru_cache(maxsize=None)
def _launcher(k: int, per_row: bool) -> Launcher:
    """The kernel for rows of ``k``, set up once per width, since the launch runs per layer per step
    on a host-bound path."""
    one_pass = k <= ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else _BLOCK
    return Launcher(_quantize_kernel, PER_ROW=per_row, ONE_PASS=one_pass, BLOCK=block,
                    num_warps=max(4, min(16, block // 1024)))
