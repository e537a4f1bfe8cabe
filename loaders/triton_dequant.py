"""Triton kernels that dequantize GGUF blocks straight to the compute dtype on CUDA, one per type.

Each program writes a contiguous run of output elements; for each element it reads its code and
its block's scales from the (cached) block bytes. The arithmetic is the torch path's, in the same
order and in fp32, with FMA contraction off, so the results are equal to it bit for bit. One launch
per weight replaces the torch path's 15-25 small kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from .quants import DEQUANTIZERS, IQ4_VALUES

BLOCK = 1024


@triton.jit
def _u8(base, off, mask):
    return tl.load(base + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(base, off, mask):
    bits = _u8(base, off, mask) | (_u8(base, off + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(base, off, shift, mask):
    return (_u8(base, off, mask) >> shift) & 0xF


@triton.jit
def _signed(x):
    """uint8 bit pattern -> its int8 value, as torch's .to(torch.int8) reads it."""
    return ((x & 0xFF) ^ 0x80) - 0x80


@triton.jit
def _kernel(src, out, table, n, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    b = e // QK
    j = (e % QK).to(tl.int32)
    base = src + b * TS
    if QTYPE == 2:  # Q4_0
        q = _nibble(base, 2 + j % 16, 4 * (j // 16), mask)
        v = _f16(base, 0, mask) * (_signed(q) - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1
        q = _nibble(base, 4 + j % 16, 4 * (j // 16), mask)
        v = _f16(base, 0, mask) * q.to(tl.float32) + _f16(base, 2, mask)
    elif QTYPE == 6:  # Q5_0
        h = (_u8(base, 2 + j // 8, mask) >> (j % 8)) & 1
        q = _nibble(base, 6 + j % 16, 4 * (j // 16), mask) | (h << 4)
        v = _f16(base, 0, mask) * (_signed(q) - 16).to(tl.float32)
    elif QTYPE == 7:  # Q5_1
        h = (_u8(base, 4 + j // 8, mask) >> (j % 8)) & 1
        q = _nibble(base, 8 + j % 16, 4 * (j // 16), mask) | (h << 4)
        v = _f16(base, 0, mask) * q.to(tl.float32) + _f16(base, 2, mask)
    elif QTYPE == 8:  # Q8_0
        v = _signed(_u8(base, 2 + j, mask)).to(tl.float32) * _f16(base, 0, mask)
    elif QTYPE == 10:  # Q2_K
        sc = _u8(base, j // 16, mask)
        q = (_u8(base, 16 + (j // 128) * 32 + j % 32, mask) >> (2 * ((j // 32) % 4))) & 3
        dl = _f16(base, 80, mask) * (sc & 0xF).to(tl.float32)
        ml = _f16(base, 82, mask) * (sc >> 4).to(tl.float32)
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == 11:  # Q3_K
        k = j // 16
        low = (_u8(base, 96 + k % 8, mask) >> (4 * (k // 8))) & 0xF
        high = (_u8(base, 104 + k % 4, mask) >> (2 * (k // 4))) & 3
        dl = _f16(base, 108, mask) * (_signed(low | (high << 4)) - 32).to(tl.float32)
        ql = (_u8(base, 32 + (j // 128) * 32 + j % 32, mask) >> (2 * ((j // 32) % 4))) & 3
        qh = ((_u8(base, j % 32, mask) >> (j // 32)) & 1) ^ 1
        v = dl * (ql - (qh << 2)).to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
        s = j // 32
        lo_idx = s % 4
        a = _u8(base, 4 + lo_idx, mask)          # scale byte of sub-block s % 4
        m_ = _u8(base, 8 + lo_idx, mask)         # min byte of sub-block s % 4
        md = _u8(base, 12 + lo_idx, mask)        # high sub-blocks' low bits
        first = s < 4
        sc = tl.where(first, a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30))
        mn = tl.where(first, m_ & 0x3F, (md >> 4) | ((m_ >> 2) & 0x30))
        dl = _f16(base, 0, mask) * sc.to(tl.float32)
        ml = _f16(base, 2, mask) * mn.to(tl.float32)
        if QTYPE == 12:
            q = _nibble(base, 16 + (s // 2) * 32 + j % 32, 4 * (s % 2), mask)
        else:
            q = _nibble(base, 48 + (s // 2) * 32 + j % 32, 4 * (s % 2), mask)
            q = q | (((_u8(base, 16 + j % 32, mask) >> s) & 1) << 4)
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == 14:  # Q6_K
        h = j // 128
        r = j % 128
        lo = _nibble(base, h * 64 + r % 64, 4 * (r // 64), mask)
        hi = (_u8(base, 128 + h * 32 + r % 32, mask) >> (2 * (r // 32))) & 3
        dl = _f16(base, 208, mask) * _signed(_u8(base, 192 + j // 16, mask)).to(tl.float32)
        v = dl * (_signed(lo | (hi << 4)) - 32).to(tl.float32)
    elif QTYPE == 20:  # IQ4_NL
        code = _nibble(base, 2 + j % 16, 4 * (j // 16), mask)
        v = _f16(base, 0, mask) * tl.load(table + code, mask=mask, other=0.0)
    else:  # 23: IQ4_XS
        s = j // 32
        i = j % 32
        low = (_u8(base, 4 + s // 2, mask) >> (4 * (s % 2))) & 0xF
        scales_h = _u8(base, 2, mask) | (_u8(base, 3, mask) << 8)
        high = (scales_h >> (2 * s)) & 3
        dl = _f16(base, 0, mask) * (_signed(low | (high << 4)) - 32).to(tl.float32)
        code = _nibble(base, 8 + s * 16 + i % 16, 4 * (i // 16), mask)
        v = dl * tl.load(table + code, mask=mask, other=0.0)
    tl.store(out + e, v.to(out.dtype.element_ty), mask=mask)


KERNEL_TYPES = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS}
_tables: dict[torch.device, torch.Tensor] = {}


def dequantize_cuda(raw: torch.Tensor, qtype: T, shape, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize the contiguous uint8 blocks ``raw`` (on a CUDA device) to ``dtype`` of ``shape``."""
    qcls = DEQUANTIZERS[qtype]
    out = torch.empty(shape, dtype=dtype, device=raw.device)
    n = out.numel()
    table = _tables.get(raw.device)
    if table is None:
        table = _tables[raw.device] = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=raw.device)
    _kernel[(triton.cdiv(n, BLOCK),)](raw, out, table, n, QTYPE=int(qtype), QK=qcls.block_size, TS=qcls.type_size,
                                      BLOCK=BLOCK, enable_fp_fusion=False)
    return out
