"""GGUF blocks decoded straight to FP8 rows on CUDA: the fp8-on-the-fly mode's weight, per call.

Each value is its block's decoding (the fused matmul's tile, ``dequant.block_tile``, fp32, the torch
path's bits) divided by its row's scale, clamped to e4m3's range and rounded to the nearest e4m3
value, ties to even: the very bytes ``fp8.quantize_rows`` makes of the dequantized weight, so a
layer run this way computes exactly as the fp8 compute mode's copy of it. Only the fp8 values are
written (1 byte per element): nothing of the weight's size in bf16.

The e4m3 bytes are assembled from the fp32 bits here rather than by Triton's conversion: its
interpreter converts without carrying a round-up into the exponent and turns NaN into a number, so
the CPU tests would see other bytes than a GPU's.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..formats import BlockFormat
from ..fp8 import FP8, FP8_MAX
from .dequant import aligned, block_tile
from .launch import Launcher, int_key

_FP8_MAX = tl.constexpr(FP8_MAX)
# 1.5 * 2**23: adding and subtracting it rounds an fp32 of magnitude below 2**22 to an integer, ties to even.
_ROUND = tl.constexpr(12582912.0)
# Elements per program: whole blocks of any type.
_ELEMENTS = 2048


@triton.jit
def _e4m3_bits(q):
    """The float8 e4m3fn byte nearest ``q`` (|q| <= 448, or NaN), ties to even, signed zeros kept."""
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    # e4m3 keeps 3 fraction bits: the values of fp32 exponent e (biased) are steps of 2**(e-127-3)
    # apart, the subnormals (below 2**-6) steps of 2**-9. Scaling by powers of two is exact, so the
    # value's count of steps, rounded, is an integer n in [0, 16]; the byte is then (e - 121) * 8 + n
    # (n = 16 carries into the next exponent, and the subnormals come out with e taken as 121).
    e = tl.maximum((bits >> 23) & 0xFF, 121)
    inverse = ((257 - e) << 23).to(tl.float32, bitcast=True)
    n = ((tl.abs(q) * inverse + _ROUND) - _ROUND).to(tl.int32)
    code = tl.where(q != q, 0x7F, (e - 121) * 8 + n)
    return (sign | code).to(tl.uint8)


@triton.jit
def _kernel(src, scales, out, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
            R: tl.constexpr, NSUB: tl.constexpr, ROW: tl.constexpr):
    # ROW, the row length, is a constant of the compiled kernel: each element's row is then found by
    # a multiply and shift, not a 64-bit division (emulated on a GPU, longer than the rest).
    blk = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    v, index, mask = block_tile(src, blk, n_blocks, QTYPE, QK, TS, NSUB)
    scale = tl.load(scales + index // ROW, mask=mask, other=1.0)
    # NaN propagates (a damaged weight's row stays NaN, as quantize_rows leaves it, for the guards to see).
    q = tl.clamp(tl.math.div_rn(v, scale), -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out + index, _e4m3_bits(q), mask=mask)


@functools.lru_cache(maxsize=None)
def _launcher(fmt: type[BlockFormat], row: int) -> Launcher:
    return Launcher(_kernel, QTYPE=int(fmt.qtype), QK=fmt.block_size, TS=fmt.type_size,
                    R=max(1, _ELEMENTS // fmt.block_size), NSUB=fmt.tile.nsub, ROW=row, enable_fp_fusion=False)


class FP8RowsDecoder:
    """The kernel bound to one weight of ``fmt`` and logical ``shape`` (out, in): grid and launch
    constants worked out once. ``FP8RowsDecoder(fmt, shape)(raw, scales)`` is the ``[out, in]`` fp8
    matrix of the contiguous blocks ``raw`` with the ``out`` fp32 row ``scales``, on their GPU."""

    def __init__(self, fmt: type[BlockFormat], shape):
        self.shape = torch.Size(shape)
        self.n_blocks = self.shape.numel() // fmt.block_size
        blocks = max(1, _ELEMENTS // fmt.block_size)
        self.grid = ((self.n_blocks + blocks - 1) // blocks, 1, 1)
        self.align = fmt.align
        self.launch = _launcher(fmt, self.shape[1])
        # What Triton specializes on that stays: the block count.
        self.blocks_key = int_key(self.n_blocks)

    def __call__(self, raw: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.uint8, device=raw.device)
        raw = aligned(raw, self.align)
        if torch.compiler.is_compiling():
            self.launch(self.grid, raw, scales, out, self.n_blocks)
            return out.view(FP8)
        # The output is a fresh allocation (aligned): what varies is the others' alignment and the device.
        key = (self.blocks_key, raw.data_ptr() % 16 == 0, scales.data_ptr() % 16 == 0, raw.get_device())
        self.launch.keyed(key, self.grid, raw, scales, out, self.n_blocks)
        return out.view(FP8)


def decode_fp8_rows(raw: torch.Tensor, fmt: type[BlockFormat], shape, scales: torch.Tensor) -> torch.Tensor:
    """The fp8 ``[out, in]`` matrix of the contiguous blocks ``raw`` with row ``scales``, once (a layer
    binds an FP8RowsDecoder instead)."""
    return FP8RowsDecoder(fmt, shape)(raw.contiguous(), scales.contiguous())
