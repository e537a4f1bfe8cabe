"""Triton kernels that dequantize GGUF blocks straight to the compute dtype on CUDA.

One kernel, specialised per type at compile time. A program takes ``R`` whole blocks as an
``[R, NSUB, SUB]`` tile (Q3_K, Q6_K and IQ4_XS: other shapes, see their functions): a block's scales are
read and decoded once per sub-block (the rows of the tile) and broadcast along it, and each code
byte is read once and split into its fields by shifts along a tile axis, so the memory traffic is
the block bytes once plus contiguous stores.
Decoding per element instead (every element re-reading and re-decoding its block's scales) left the
K-quants at 40% of the copy bandwidth. The arithmetic is the torch path's, in the same order and
in fp32, with FMA contraction off (Q3_K's integer-to-float step by an exact equivalent, see _minus),
so the results are equal to it bit for bit. Q6_K reads its f16 d by a 2-byte load and IQ4_XS its
d and scales by one 8-byte load, which need the blocks at an 8-byte aligned address: aligned().
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from .kernel_tiles import TILES, Tile, tiles_for
from .quants import DEQUANTIZERS, IQ4_VALUES
from .triton_launch import Launcher

log = logging.getLogger(__name__)


@triton.jit
def _u8(base, off, mask):
    return tl.load(base + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(base, off, mask):
    bits = _u8(base, off, mask) | (_u8(base, off + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u32(base, off, mask):
    return (_u8(base, off, mask) | (_u8(base, off + 1, mask) << 8) | (_u8(base, off + 2, mask) << 16)
            | (_u8(base, off + 3, mask) << 24))


@triton.jit
def _signed(x):
    """uint8 bit pattern -> its int8 value, as torch's .to(torch.int8) reads it."""
    return ((x & 0xFF) ^ 0x80) - 0x80


def _pack(values) -> int:
    """Eight int8 values as the bytes of one int64, the first in the lowest byte."""
    word = sum((v & 0xFF) << (8 * i) for i, v in enumerate(values))
    return word - (1 << 64) if word >= 1 << 63 else word


# The 16 IQ4 code values as int8 bytes in two 64-bit constants, for decoding a code by shifts of a
# register instead of a gather from the table in memory (see _iq4).
_IQ4_LOW = tl.constexpr(_pack(IQ4_VALUES[:8]))
_IQ4_HIGH = tl.constexpr(_pack(IQ4_VALUES[8:]))


@triton.jit
def _iq4(table, code, mask, IQ4_REGS: tl.constexpr):
    """IQ4_VALUES[code] as fp32, from ``table`` or (IQ4_REGS) from the packed constants. Measured on
    an H200: the dequant kernel runs faster with the table (an L1-resident gather: IQ4_NL at 74% of
    the copy bandwidth against 67%, both with the H100 tile), the fused kernel 5-8x faster with the
    registers."""
    if IQ4_REGS:
        word = tl.where(code < 8, tl.full(code.shape, _IQ4_LOW, tl.int64), tl.full(code.shape, _IQ4_HIGH, tl.int64))
        return _signed((word >> ((code & 7) * 8).to(tl.int64)).to(tl.int32)).to(tl.float32)
    else:
        return tl.load(table + code, mask=mask, other=0.0)


@triton.jit
def _minus(x, offset: tl.constexpr):
    """``x - offset`` in fp32, exactly, for ints 0 <= x < 2**23: x put in the mantissa of 2**23 by a
    bitwise or, then one subtraction (an integer subtraction and a conversion cost more: Q3_K ran at
    87% of the copy bandwidth on an H200 this way, 83% the other)."""
    return (x | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _q3_k(src, blk, n_blocks, TS: tl.constexpr):
    """Q3_K as a [blocks, half, shift, 2, 16] tile: each code byte is read once for its 4 two-bit
    fields and each high-bit byte once for its 8 bits (the block size, 110, rules out wide loads)."""
    b = blk[:, None, None, None, None]
    h = tl.arange(0, 2)[None, :, None, None, None]
    k = tl.arange(0, 4)[None, None, :, None, None]
    hb = tl.arange(0, 2)[None, None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    s = h * 8 + k * 2 + hb
    low = (_u8(base, 96 + s % 8, mask) >> (4 * (s // 8))) & 0xF
    high = (_u8(base, 104 + s % 4, mask) >> (2 * (s // 4))) & 3
    dl = _f16(base, 108, mask) * (_signed(low | (high << 4)) - 32).to(tl.float32)
    ql = (_u8(base, 32 + h * 32 + hb * 16 + i, mask) >> (2 * k)) & 3
    # ql - 4 * (1 - qh) = (ql | qh << 2) - 4
    qh = (_u8(base, hb * 16 + i, mask) >> (h * 4 + k)) & 1
    return dl * _minus(ql | (qh << 2), 4), b * 256 + h * 128 + k * 32 + hb * 16 + i, mask


@triton.jit
def _as(ptr, dtype: tl.constexpr, mask):
    """The ``dtype`` value at ``ptr`` (aligned for it: see aligned()), as fp32."""
    return tl.load(ptr.to(tl.pointer_type(dtype)), mask=mask, other=0).to(tl.float32)


@triton.jit
def _q6_k_codes(base, mask, b, h, a, c, hb, i):
    """Q6_K's 6-bit codes (0..63) and their indices in the dequantized tensor for the element axes
    ``b`` (block), ``h`` (half), ``a`` (nibble), ``c``, ``hb``, ``i``, broadcast in either tile order."""
    lo = (_u8(base, h * 64 + c * 32 + hb * 16 + i, mask) >> (4 * a)) & 0xF
    hi = (_u8(base, 128 + h * 32 + hb * 16 + i, mask) >> (2 * (a * 2 + c))) & 3
    return lo | (hi << 4), b * 256 + h * 128 + a * 64 + c * 32 + hb * 16 + i


@triton.jit
def _q6_k_rows(src, blk, n_blocks, TS: tl.constexpr):
    """Q6_K as a [blocks, half, nibble, 2, 2, 16] tile, in the order a dot takes (see _q6_k): a
    byte's fields sit in different threads, each loading the byte itself."""
    b = blk[:, None, None, None, None, None]
    h = tl.arange(0, 2)[None, :, None, None, None, None]
    a = tl.arange(0, 2)[None, None, :, None, None, None]
    c = tl.arange(0, 2)[None, None, None, :, None, None]
    hb = tl.arange(0, 2)[None, None, None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    q, index = _q6_k_codes(base, mask, b, h, a, c, hb, i)
    dl = _f16(base, 208, mask) * _signed(_u8(base, 192 + h * 8 + a * 4 + c * 2 + hb, mask)).to(tl.float32)
    return dl * (_signed(q) - 32).to(tl.float32), index, mask


@triton.jit
def _q6_k(src, blk, n_blocks, TS: tl.constexpr):
    """Q6_K as an [a, c, blocks, half, 2, 16] tile: a low-bits byte holds fields a = 0, 1 (its two
    nibbles), a high-bits byte fields (a, c) (its four 2-bit pairs). The bytes are read at their own
    shapes (without those axes) and broadcast: each is loaded once per program, and Triton hands it
    to its fields' threads through shared memory, instead of every field's thread loading it. On an
    H200 (README): 8% less time under Nsight Compute than the blocks-first tile with the same scale
    loads, 87% of the copy bandwidth in one run against 79.5% for _q6_k_rows's tile, but 71% in two
    runs of bench/dequant_bandwidth.py. The fused matmul takes _q6_k_rows: permuted to the blocks'
    rows a dot needs, this tile made it 0.8-0.9x of dequant + cuBLAS, where _q6_k_rows gives
    1.2-1.4x."""
    a = tl.arange(0, 2)[:, None, None, None, None, None]
    c = tl.arange(0, 2)[None, :, None, None, None, None]
    b = blk[None, None, :, None, None, None]
    h = tl.arange(0, 2)[None, None, None, :, None, None]
    hb = tl.arange(0, 2)[None, None, None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    q, index = _q6_k_codes(base, mask, b, h, a, c, hb, i)
    dl = _as(base + 208, tl.float16, mask) * _as(base + 192 + h * 8 + a * 4 + c * 2 + hb, tl.int8, mask)
    return dl * _minus(q, 32), index, mask


@triton.jit
def _iq4_xs(src, table, blk, n_blocks, TS: tl.constexpr, IQ4_REGS: tl.constexpr):
    """IQ4_XS as a [nibble, blocks, sub-block, 16] tile, each code byte read once for both nibbles as
    in _q6_k (on an H200 88-89% of the copy bandwidth in two runs and 66% in a third, against 70-71%
    as [blocks, 16, 16]). A block's d, scales_h and scales_l are its first 8 bytes, one load (blocks
    are 136 = 8 * 17 bytes)."""
    n = tl.arange(0, 2)[:, None, None, None]
    b = blk[None, :, None, None]
    k = tl.arange(0, 8)[None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    head = tl.load(base.to(tl.pointer_type(tl.int64)), mask=mask, other=0)
    d = (head & 0xFFFF).to(tl.int32).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    sc = (((head >> 32).to(tl.int32) >> (4 * k)) & 0xF) | ((((head >> 16).to(tl.int32) >> (2 * k)) & 3) << 4)
    code = (_u8(base, 8 + k * 16 + i, mask) >> (4 * n)) & 0xF
    return d * _minus(sc, 32) * _iq4(table, code, mask, IQ4_REGS), b * 256 + k * 32 + n * 16 + i, mask


@triton.jit
def _kernel(src, out, table, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
            R: tl.constexpr, NSUB: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    v, index, mask = block_tile(src, table, blk, n_blocks, QTYPE, QK, TS, NSUB, False)
    tl.store(out + index, v.to(out.dtype.element_ty), mask=mask)


@triton.jit
def block_tile(src, table, blk, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
               NSUB: tl.constexpr, FOR_DOT: tl.constexpr):
    """The values of blocks ``blk`` (fp32, one tile axis per field of the type's layout; FOR_DOT, with
    block_rows and reshaped to ``[len(blk), QK]``, they are the blocks' rows), each value's index in
    the dequantized tensor, and which blocks exist (``blk < n_blocks``). IQ4 codes are looked
    up in ``table``. FOR_DOT: the tile of the fused matmul, with IQ4 codes decoded from registers
    (see _iq4) and Q6_K's tile in the blocks' order (see _q6_k)."""
    if QTYPE == 11:
        return _q3_k(src, blk, n_blocks, TS)
    elif QTYPE == 14:
        if FOR_DOT:
            return _q6_k_rows(src, blk, n_blocks, TS)
        else:
            return _q6_k(src, blk, n_blocks, TS)
    elif QTYPE == 23:
        return _iq4_xs(src, table, blk, n_blocks, TS, FOR_DOT)
    else:
        return _sub_block_tile(src, table, blk, n_blocks, QTYPE, QK, TS, NSUB, FOR_DOT)


@triton.jit
def block_rows(v, QTYPE: tl.constexpr):
    """A FOR_DOT block_tile's values with the blocks' axis first (IQ4_XS has its nibble axis before it)."""
    if QTYPE == 23:
        return tl.permute(v, (1, 2, 0, 3))
    else:
        return v


@triton.jit
def _sub_block_tile(src, table, blk, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                    NSUB: tl.constexpr, IQ4_REGS: tl.constexpr):
    SUB: tl.constexpr = QK // NSUB
    b = blk[:, None, None]
    s = tl.arange(0, NSUB)[None, :, None]
    i = tl.arange(0, SUB)[None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    # Sub-block s of a 32-element block is one nibble half (NSUB 2, SUB 16); of a 256-element
    # block, 16 or 32 consecutive elements sharing one scale.
    if QTYPE == 2:  # Q4_0
        q = (_u8(base, 2 + i, mask) >> (4 * s)) & 0xF
        v = _f16(base, 0, mask) * (_signed(q) - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1
        q = (_u8(base, 4 + i, mask) >> (4 * s)) & 0xF
        v = _f16(base, 0, mask) * q.to(tl.float32) + _f16(base, 2, mask)
    elif QTYPE == 6:  # Q5_0
        h = (_u32(base, 2, mask) >> (s * 16 + i)) & 1
        q = ((_u8(base, 6 + i, mask) >> (4 * s)) & 0xF) | (h << 4)
        v = _f16(base, 0, mask) * (_signed(q) - 16).to(tl.float32)
    elif QTYPE == 7:  # Q5_1
        h = (_u32(base, 4, mask) >> (s * 16 + i)) & 1
        q = ((_u8(base, 8 + i, mask) >> (4 * s)) & 0xF) | (h << 4)
        v = _f16(base, 0, mask) * q.to(tl.float32) + _f16(base, 2, mask)
    elif QTYPE == 8:  # Q8_0
        v = _signed(_u8(base, 2 + s * SUB + i, mask)).to(tl.float32) * _f16(base, 0, mask)
    elif QTYPE == 10:  # Q2_K: sixteen 16-element sub-blocks, 2-bit codes packed four to a byte
        sc = _u8(base, s, mask)
        dl = _f16(base, 80, mask) * (sc & 0xF).to(tl.float32)
        ml = _f16(base, 82, mask) * (sc >> 4).to(tl.float32)
        q = (_u8(base, 16 + (s // 8) * 32 + (s % 2) * 16 + i, mask) >> (2 * ((s // 2) % 4))) & 3
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: eight 32-element sub-blocks, 6-bit scale and min
        a = _u8(base, 4 + s % 4, mask)
        m_ = _u8(base, 8 + s % 4, mask)
        md = _u8(base, 12 + s % 4, mask)
        first = s < 4
        sc = tl.where(first, a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30))
        mn = tl.where(first, m_ & 0x3F, (md >> 4) | ((m_ >> 2) & 0x30))
        dl = _f16(base, 0, mask) * sc.to(tl.float32)
        ml = _f16(base, 2, mask) * mn.to(tl.float32)
        if QTYPE == 12:
            q = (_u8(base, 16 + (s // 2) * 32 + i, mask) >> (4 * (s % 2))) & 0xF
        else:
            q = (_u8(base, 48 + (s // 2) * 32 + i, mask) >> (4 * (s % 2))) & 0xF
            q = q | (((_u8(base, 16 + i, mask) >> s) & 1) << 4)
        v = dl * q.to(tl.float32) - ml
    else:  # 20: IQ4_NL
        code = (_u8(base, 2 + i, mask) >> (4 * s)) & 0xF
        v = _f16(base, 0, mask) * _iq4(table, code, mask, IQ4_REGS)
    return v, b * QK + s * SUB + i, mask


KERNEL_TYPES = set(TILES)
_tables: dict[torch.device, torch.Tensor] = {}


def lookup_table(device: torch.device) -> torch.Tensor:
    """The IQ4 code values on ``device`` (made once: the per-layer path launches no copies)."""
    table = _tables.get(device)
    if table is None:
        table = _tables[device] = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=device)
    return table


@functools.cache
def _warn_misaligned() -> None:
    log.warning("GGUF blocks at an address off an 8-byte boundary: each dequant copies them first (slower)")


def aligned(raw: torch.Tensor) -> torch.Tensor:
    """``raw``, or where it starts off an 8-byte boundary (a view into a larger buffer) a copy that
    does not. Traced code (torch.compile) has no addresses: there ``raw`` is taken as it is."""
    if torch.compiler.is_compiling() or raw.data_ptr() % 8 == 0:
        return raw
    _warn_misaligned()
    return raw.clone()


def dequantize_cuda(raw: torch.Tensor, qtype: T, shape, dtype: torch.dtype, tile: Tile | None = None) -> torch.Tensor:
    """Dequantize the contiguous uint8 blocks ``raw`` (on a CUDA device) to ``dtype`` of ``shape``."""
    raw = aligned(raw)
    # Traced code (torch.compile) takes the default tiles: the device's name is not read there.
    tile = tile or (TILES if torch.compiler.is_compiling() else tiles_for(raw.get_device()))[qtype]
    launch, block_size, blocks, uses_table = _plan(qtype, tile)
    out = torch.empty(shape, dtype=dtype, device=raw.device)
    n_blocks = out.numel() // block_size
    # Only the IQ4 types read the table; the others get any pointer (the bytes) instead of a lookup.
    launch(((n_blocks + blocks - 1) // blocks,), raw, out, lookup_table(raw.device) if uses_table else raw, n_blocks)
    return out


@functools.lru_cache(maxsize=None)
def _plan(qtype: T, tile: Tile) -> tuple[Launcher, int, int, bool]:
    """(launcher, elements per block, blocks per program, whether the kernel reads the IQ4 table) for
    a type: worked out once, since the launch runs per layer per step on a host-bound path."""
    qcls = DEQUANTIZERS[qtype]
    launch = Launcher(_kernel, QTYPE=int(qtype), QK=qcls.block_size, TS=qcls.type_size, R=tile.blocks,
                      NSUB=tile.nsub, num_warps=tile.num_warps, enable_fp_fusion=False)
    return launch, qcls.block_size, tile.blocks, qtype in (T.IQ4_NL, T.IQ4_XS)
