"""A fused dequantize-and-multiply for few tokens: ``x @ W.T`` reading only W's GGUF block bytes.

With a handful of rows in ``x`` (a text encoder's prompt, a batch-1 edit, the diffusion model's
per-step modulation inputs) a linear layer is bound by reading its weight. Dequantizing first
writes and re-reads the weight in bf16, 2 bytes per element on top of its 0.5-1 byte of blocks;
this kernel decodes each tile of blocks in registers (dequant.block_tile: the dequant
kernel's tiles for most types, tiles of the blocks' rows for Q6_K and the IQ4 types, the same bits)
and feeds it straight to the tensor cores. Where it pays off is decided by a layer's plan (``plan``:
a rule on the weight's size and the row count).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..formats import BlockFormat
from .dequant import aligned, block_rows, block_tile
from .launch import Launcher, int_key


@triton.jit
def _fused_kernel(x, src, bias, out, M, N, K, stride_xm, stride_om,
                  QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr, NSUB: tl.constexpr,
                  G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    # Output columns are the weight's rows: a program owns BN of them, so each block is decoded
    # once per BM rows of x; with few rows there is a single row-block and every byte is read once.
    # With few programs that way (a narrow weight), SPLIT of them share a row's K range and add
    # their partial sums into an fp32 output.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    blocks_per_row = K // QK
    n_blocks = N * blocks_per_row
    BK: tl.constexpr = G * QK
    rk = tl.arange(0, BK)
    x_rows = x + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    steps = blocks_per_row // G
    per_split = tl.cdiv(steps, SPLIT)
    for kb in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, steps)):
        # G consecutive blocks of each of the BN weight rows: a [BN, G*QK] slice of W.
        blk = tl.reshape(rn[:, None] * blocks_per_row + kb * G + tl.arange(0, G)[None, :], (BN * G,))
        v, _, _ = block_tile(src, blk, n_blocks, QTYPE, QK, TS, NSUB)
        w = tl.reshape(block_rows(v, QTYPE), (BN, BK)).to(x.dtype.element_ty)
        a = tl.load(x_rows + kb * BK + rk[None, :], mask=rm[:, None] < M, other=0.0)
        if IEEE:
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w))
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    target = out + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if SPLIT == 1:
        tl.store(target, acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(target, acc, mask=mask, sem="relaxed")


@functools.lru_cache(maxsize=None)
def _launcher(**named) -> Launcher:
    return Launcher(_fused_kernel, **named)


def _blocks_per_step(fmt: type[BlockFormat], blocks_per_row: int) -> int:
    """How many blocks of a row one loop step takes: 128-256 elements of K (32-element types take
    several), dividing the row so that no step runs past its end."""
    want = max(1, 128 // fmt.block_size)
    while blocks_per_row % want:
        want //= 2
    return want


ROW_TILES = (16, 32, 64)


def _row_tile(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split(programs: int, steps: int, device: torch.device) -> int:
    """Into how many K ranges to split each output tile: enough for two programs per SM, each
    range at least 4 loop steps, a power of two up to 16."""
    sms = _multiprocessors(device)
    split = 1
    while programs * split < 2 * sms and steps >= 8 * split and split < 16:
        split *= 2
    return split


class FusedMatmul:
    """The fused kernel bound to one weight of ``fmt`` and logical ``shape`` (out_features,
    in_features) on ``device``: its loop step, grid and launch constants worked out once (when the
    layer is loaded), since a text encoder generating runs it per layer per token on a host-bound
    path. ``FusedMatmul(fmt, shape, device)(x, raw, bias)`` is ``linear(x, W, bias)`` for W given as
    its contiguous GGUF block bytes ``raw``, the result in ``x``'s dtype.

    ``may_split=False`` keeps every output tile in one program: splitting K adds two launches (the
    fp32 output zeroed, then cast), more host time than the kernel of a small weight takes on the GPU.
    (The tile defaults were the best for 2-256 rows on an H100 with bench/fused_matmul.py --sweep.)"""

    def __init__(self, fmt: type[BlockFormat], shape, device: torch.device, block_n: int = 32,
                 num_warps: int = 4, num_stages: int = 3, split: int | None = None, may_split: bool = True):
        self.n, self.k = shape
        self.align = fmt.align
        g = _blocks_per_step(fmt, self.k // fmt.block_size)
        self.grid_n = triton.cdiv(self.n, block_n)
        self.split = split or (_split(self.grid_n, self.k // fmt.block_size // g, torch.device(device))
                               if may_split else 1)
        self.named = dict(QTYPE=int(fmt.qtype), QK=fmt.block_size, TS=fmt.type_size, NSUB=fmt.tile.nsub, G=g,
                          BN=block_n, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
        # What Triton specializes on that stays: n and k, and the output's row stride (n).
        self.shape_key = (int_key(self.n), int_key(self.k))
        # Per (row tile, bias or not, dtype): the launcher, the split and the grid; all bound here, so
        # that a call (traced by torch.compile too) only looks one up.
        self.bound = {(bm, has_bias, dtype): self._bind(bm, has_bias, dtype) for bm in ROW_TILES
                      for has_bias in (False, True) for dtype in (torch.bfloat16, torch.float16, torch.float32)}

    def _bind(self, bm: int, has_bias: bool, dtype: torch.dtype) -> tuple[Launcher, int, tuple]:
        launch = _launcher(BM=bm, SPLIT=self.split, HAS_BIAS=has_bias, IEEE=dtype == torch.float32, **self.named)
        return launch, self.split, (self.grid_n, 1, self.split)

    def __call__(self, x: torch.Tensor, raw: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # Runs per layer per generated token, on a path that waits on the host: each tensor attribute
        # is read once, and the output is allocated in the result's shape.
        n, k = self.n, self.k
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m, stride = x2.shape[0], x2.stride(0)
        bm = _row_tile(m)
        has_bias = bias is not None
        launch, split, grid = self.bound[bm, has_bias, x.dtype]
        if m > bm:  # more rows than one tile: a row of programs per tile
            grid = (grid[0], triton.cdiv(m, bm), grid[2])
        if split == 1:
            out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
        else:
            out = torch.zeros((*lead, n), dtype=torch.float32, device=x.device)
        b = bias if has_bias else out
        if torch.compiler.is_compiling():
            launch(grid, x2, raw, b, out, m, n, k, stride, n)
        else:
            address = raw.data_ptr()
            if address % self.align:
                raw = aligned(raw, self.align)
                address = raw.data_ptr()
            # The output is a fresh allocation (aligned): what varies is the other tensors' alignment
            # and device, and the row count and stride.
            key = (self.shape_key, x.dtype, x2.data_ptr() % 16 == 0, address % 16 == 0,
                   b.dtype, b.data_ptr() % 16 == 0, x.get_device(), int_key(m), int_key(stride))
            launch.keyed(key, grid, x2, raw, b, out, m, n, k, stride, n)
        return out if split == 1 else out.to(x.dtype)


def fused_linear(x: torch.Tensor, raw: torch.Tensor, fmt: type[BlockFormat], shape, bias: torch.Tensor | None = None,
                 block_n: int = 32, num_warps: int = 4, num_stages: int = 3, split: int | None = None) -> torch.Tensor:
    """``linear(x, W, bias)`` once, for W given as its contiguous GGUF block bytes ``raw`` of logical
    ``shape`` (out_features, in_features), all on one CUDA device (a layer binds a FusedMatmul instead)."""
    return FusedMatmul(fmt, shape, x.device, block_n, num_warps, num_stages, split)(x, raw, bias)
