"""Triton kernels that dequantize GGUF blocks straight to the compute dtype on CUDA.

One kernel, specialised per type at compile time. A program takes ``R`` whole blocks as an
``[R, NSUB, SUB]`` tile (Q3_K, and in the fused kernel Q6_K and IQ4_XS: other shapes, see their
functions): a block's scales are read and decoded once per sub-block (the rows of the tile) and
broadcast along it, and each code byte is read once and split into its fields by shifts along a
tile axis, so the memory traffic is the block bytes once plus contiguous stores. Q6_K and the IQ4 types decode 2-byte words instead, both bytes at once, and
store the values from the threads that loaded their bytes (see _store_pairs).
Decoding per element instead (every element re-reading and re-decoding its block's scales) left the
K-quants at 40% of the copy bandwidth. The arithmetic is the torch path's, in the same order and
in fp32, with FMA contraction off (some integer-to-float steps by an exact equivalent, see _minus),
so the results are equal to it bit for bit. Q6_K and IQ4_NL read 2-byte words, which any of their
blocks is aligned for, and IQ4_XS its d and scales as one 8-byte load, which needs the blocks at an
8-byte aligned address: aligned().
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from ..formats import IQ4_VALUES, BlockFormat
from .launch import Launcher, int_key

log = logging.getLogger(__name__)

# The kernels are specialised on a type's GGML id (the QTYPE constexpr), compared with these.
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (tl.constexpr(int(q)) for q in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0))
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (tl.constexpr(int(q)) for q in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))
IQ4_NL, IQ4_XS = tl.constexpr(int(T.IQ4_NL)), tl.constexpr(int(T.IQ4_XS))


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
# register instead of a gather from the table in memory (see _iq4_regs).
_IQ4_LOW = tl.constexpr(_pack(IQ4_VALUES[:8]))
_IQ4_HIGH = tl.constexpr(_pack(IQ4_VALUES[8:]))


@triton.jit
def _iq4_regs(code):
    """IQ4_VALUES[code] as fp32, from the packed constants: the fused kernel's way (several times
    faster there than a gather from the table in memory, which the dequant kernel uses instead:
    docs/PERFORMANCE.md)."""
    word = tl.where(code < 8, tl.full(code.shape, _IQ4_LOW, tl.int64), tl.full(code.shape, _IQ4_HIGH, tl.int64))
    return _signed((word >> ((code & 7) * 8).to(tl.int64)).to(tl.int32)).to(tl.float32)


@triton.jit
def _minus(x, offset: tl.constexpr):
    """``x - offset`` in fp32, exactly, for ints 0 <= x < 2**23: x put in the mantissa of 2**23 by a
    bitwise or, then one subtraction (cheaper than an integer subtraction and a conversion)."""
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
def _q6_k(src, blk, n_blocks, TS: tl.constexpr):
    """Q6_K as a [blocks, half, nibble, 2, 2, 16] tile, in the blocks' order a dot takes (the fused
    kernel's; the dequant kernel stores through _q6_k_store): a byte's fields sit in different
    threads, each loading the byte itself."""
    b = blk[:, None, None, None, None, None]
    h = tl.arange(0, 2)[None, :, None, None, None, None]
    a = tl.arange(0, 2)[None, None, :, None, None, None]
    c = tl.arange(0, 2)[None, None, None, :, None, None]
    hb = tl.arange(0, 2)[None, None, None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    lo = (_u8(base, h * 64 + c * 32 + hb * 16 + i, mask) >> (4 * a)) & 0xF
    hi = (_u8(base, 128 + h * 32 + hb * 16 + i, mask) >> (2 * (a * 2 + c))) & 3
    dl = _f16(base, 208, mask) * _signed(_u8(base, 192 + h * 8 + a * 4 + c * 2 + hb, mask)).to(tl.float32)
    return dl * (_signed(lo | (hi << 4)) - 32).to(tl.float32), b * 256 + h * 128 + a * 64 + c * 32 + hb * 16 + i, mask


@triton.jit
def _u16(base, off, p, mask):
    """Words ``p`` (2 bytes each, 2-byte aligned) of the bytes at ``base + off``, as int32s with the
    first byte low. Indexed in words, so that Triton sees consecutive ``p`` as contiguous."""
    return tl.load((base + off).to(tl.pointer_type(tl.uint16)) + p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _store_pairs(out, start, first, second, mask):
    """Store ``first`` at ``out + start`` and ``second`` at the element after it, two contiguous
    elements per thread. The word kernels' tiles put the word axis first: Triton 3.6 lays out loads
    and stores by their contiguous axis, ties in axis order, so the words' loads and these stores get
    the same layout (consecutive words in consecutive threads) and need no exchange through shared
    memory (offline TTGIR). Triton 3.8 breaks the ties the other way and exchanges the values
    through shared memory before the stores (offline; not timed)."""
    index = tl.expand_dims(start, -1) + tl.arange(0, 2)
    tl.store(out + index, tl.join(first, second).to(out.dtype.element_ty), mask=tl.expand_dims(mask, -1))


@triton.jit
def _q6_k_pair(lo, hi, A: tl.constexpr, C: tl.constexpr):
    """Fields (A, C) of two values at once, one 6-bit code per byte of an int32: nibble A of the
    low-bits byte pair ``lo`` with 2-bit pair 2 * A + C of the high-bits byte pair ``hi`` on top."""
    SHIFT: tl.constexpr = 2 * (A * 2 + C)
    if SHIFT <= 4:
        top = (hi << (4 - SHIFT)) & 0x3030
    else:
        top = (hi >> (SHIFT - 4)) & 0x3030
    return ((lo >> (4 * A)) & 0x0F0F) | top


@triton.jit
def _q6_k_store(src, out, blk, n_blocks, TS: tl.constexpr):
    """Dequantize Q6_K blocks ``blk`` into ``out`` from a [4, half, 2, blocks, 2] tile of the
    high-bits bytes' words (word p + 4 * q of a 16-byte row at (p, ..., q)). A high-bits byte holds
    the top bits of four values (fields a, c) whose low nibbles are in two low-bits bytes (c = 0, 1;
    nibbles a = 0, 1), so each thread loads three words for each of its two words of a row, decodes
    both bytes of a word in one int32 and stores four value pairs. The last axis keeps two words of
    a row in one thread, which then loads the row's four scales once for both (faster than one word
    per thread)."""
    p = tl.arange(0, 4)[:, None, None, None, None] + 4 * tl.arange(0, 2)[None, None, None, None, :]
    h = tl.arange(0, 2)[None, :, None, None, None]
    hb = tl.arange(0, 2)[None, None, :, None, None]
    b = blk[None, None, None, :, None]
    mask = b < n_blocks
    base = src + b * TS
    hi = _u16(base, 128 + h * 32 + hb * 16, p, mask)
    d = _as(base + 208, tl.float16, mask)
    for c in tl.static_range(2):
        lo = _u16(base, h * 64 + c * 32 + hb * 16, p, mask)
        for a in tl.static_range(2):
            q = _q6_k_pair(lo, hi, a, c)
            dl = d * _as(base + 192 + h * 8 + a * 4 + c * 2 + hb, tl.int8, mask)
            _store_pairs(out, b * 256 + h * 128 + a * 64 + c * 32 + hb * 16 + p * 2,
                         dl * _minus(q & 0xFF, 32), dl * _minus(q >> 8, 32), mask)


@triton.jit
def _iq4_xs_scales(base, k, mask):
    """IQ4_XS's d (fp32) and the 6-bit scales of sub-blocks ``k``, from the block's first 8 bytes
    (d, scales_h, scales_l) read as one int64 (blocks are 136 = 8 * 17 bytes)."""
    head = tl.load(base.to(tl.pointer_type(tl.int64)), mask=mask, other=0)
    d = (head & 0xFFFF).to(tl.int32).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    sc = (((head >> 32).to(tl.int32) >> (4 * k)) & 0xF) | ((((head >> 16).to(tl.int32) >> (2 * k)) & 3) << 4)
    return d, sc


@triton.jit
def _iq4_xs(src, blk, n_blocks, TS: tl.constexpr):
    """IQ4_XS as a [nibble, blocks, sub-block, 16] tile for the fused kernel, each code byte read
    once for both nibbles (block_rows puts the blocks first)."""
    n = tl.arange(0, 2)[:, None, None, None]
    b = blk[None, :, None, None]
    k = tl.arange(0, 8)[None, None, :, None]
    i = tl.arange(0, 16)[None, None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    d, sc = _iq4_xs_scales(base, k, mask)
    code = (_u8(base, 8 + k * 16 + i, mask) >> (4 * n)) & 0xF
    return d * _minus(sc, 32) * _iq4_regs(code), b * 256 + k * 32 + n * 16 + i, mask


@triton.jit
def _iq4_values(table, w, N: tl.constexpr, dl, mask):
    """The values of nibble N (0 low, 1 high) of both code bytes of words ``w``, looked up in
    ``table`` and scaled by ``dl``: the first byte's, then the second's."""
    return (dl * tl.load(table + ((w >> (4 * N)) & 0xF), mask=mask, other=0.0),
            dl * tl.load(table + ((w >> (8 + 4 * N)) & 0xF), mask=mask, other=0.0))


@triton.jit
def _iq4_xs_store(src, out, table, blk, n_blocks, TS: tl.constexpr):
    """Dequantize IQ4_XS blocks ``blk`` into ``out`` from an [8, sub-block, blocks] tile of the code
    bytes' words (see _q6_k_store). The blocks start at 8-byte boundaries, so where ``src`` is
    16-byte aligned (what Triton specialises on) Triton loads four words per thread at once; their
    values are put in memory order (a permute and a reshape, both within each thread's registers)
    and stored eight at a time, in the loads' layout again (Triton 3.6, offline TTGIR)."""
    p = tl.arange(0, 8)[:, None, None]
    k = tl.arange(0, 8)[None, :, None]
    b = blk[None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    d, sc = _iq4_xs_scales(base, k, mask)
    dl = d * _minus(sc, 32)
    w = _u16(base, 8 + k * 16, p, mask)
    r = tl.arange(0, 16)[:, None, None]
    for n in tl.static_range(2):
        first, second = _iq4_values(table, w, n, dl, mask)
        v = tl.reshape(tl.permute(tl.join(first, second), (0, 3, 1, 2)), (16, 8, w.shape[2]))
        tl.store(out + b * 256 + k * 32 + n * 16 + r, v.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _iq4_nl_store(src, out, table, blk, n_blocks, TS: tl.constexpr):
    """Dequantize IQ4_NL blocks ``blk`` into ``out`` from an [8, blocks] tile of the code bytes' words."""
    p = tl.arange(0, 8)[:, None]
    b = blk[None, :]
    mask = b < n_blocks
    base = src + b * TS
    start = b * 32 + p * 2
    d = _as(base, tl.float16, mask)
    w = _u16(base, 2, p, mask)
    for n in tl.static_range(2):
        first, second = _iq4_values(table, w, n, d, mask)
        _store_pairs(out, start + n * 16, first, second, mask)


@triton.jit
def _kernel(src, out, table, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
            R: tl.constexpr, NSUB: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    if QTYPE == Q6_K:
        _q6_k_store(src, out, blk, n_blocks, TS)
    elif QTYPE == IQ4_NL:
        _iq4_nl_store(src, out, table, blk, n_blocks, TS)
    elif QTYPE == IQ4_XS:
        _iq4_xs_store(src, out, table, blk, n_blocks, TS)
    else:
        v, index, mask = block_tile(src, blk, n_blocks, QTYPE, QK, TS, NSUB)
        tl.store(out + index, v.to(out.dtype.element_ty), mask=mask)


@triton.jit
def block_tile(src, blk, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr, NSUB: tl.constexpr):
    """The values of blocks ``blk`` (fp32, one tile axis per field of the type's layout; with
    block_rows and reshaped to ``[len(blk), QK]``, they are the blocks' rows), each value's index in
    the dequantized tensor, and which blocks exist (``blk < n_blocks``). The fused matmul's tile for
    every type, the dequant kernel's for all but Q6_K and the IQ4 types (their _store functions)."""
    if QTYPE == Q3_K:
        return _q3_k(src, blk, n_blocks, TS)
    elif QTYPE == Q6_K:
        return _q6_k(src, blk, n_blocks, TS)
    elif QTYPE == IQ4_XS:
        return _iq4_xs(src, blk, n_blocks, TS)
    else:
        return _sub_block_tile(src, blk, n_blocks, QTYPE, QK, TS, NSUB)


@triton.jit
def block_rows(v, QTYPE: tl.constexpr):
    """A block_tile's values with the blocks' axis first (IQ4_XS has its nibble axis before it)."""
    if QTYPE == IQ4_XS:
        return tl.permute(v, (1, 2, 0, 3))
    else:
        return v


@triton.jit
def _sub_block_tile(src, blk, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                    NSUB: tl.constexpr):
    SUB: tl.constexpr = QK // NSUB
    b = blk[:, None, None]
    s = tl.arange(0, NSUB)[None, :, None]
    i = tl.arange(0, SUB)[None, None, :]
    mask = b < n_blocks
    base = src + b * TS
    # Sub-block s of a 32-element block is one nibble half (NSUB 2, SUB 16); of a 256-element
    # block, 16 or 32 consecutive elements sharing one scale.
    if QTYPE == Q4_0:
        q = (_u8(base, 2 + i, mask) >> (4 * s)) & 0xF
        v = _f16(base, 0, mask) * (_signed(q) - 8).to(tl.float32)
    elif QTYPE == Q4_1:
        q = (_u8(base, 4 + i, mask) >> (4 * s)) & 0xF
        v = _f16(base, 0, mask) * q.to(tl.float32) + _f16(base, 2, mask)
    elif QTYPE == Q5_0:
        h = (_u32(base, 2, mask) >> (s * 16 + i)) & 1
        q = ((_u8(base, 6 + i, mask) >> (4 * s)) & 0xF) | (h << 4)
        v = _f16(base, 0, mask) * (_signed(q) - 16).to(tl.float32)
    elif QTYPE == Q5_1:
        h = (_u32(base, 4, mask) >> (s * 16 + i)) & 1
        q = ((_u8(base, 8 + i, mask) >> (4 * s)) & 0xF) | (h << 4)
        v = _f16(base, 0, mask) * q.to(tl.float32) + _f16(base, 2, mask)
    elif QTYPE == Q8_0:
        v = _signed(_u8(base, 2 + s * SUB + i, mask)).to(tl.float32) * _f16(base, 0, mask)
    elif QTYPE == Q2_K:  # sixteen 16-element sub-blocks, 2-bit codes packed four to a byte
        sc = _u8(base, s, mask)
        dl = _f16(base, 80, mask) * (sc & 0xF).to(tl.float32)
        ml = _f16(base, 82, mask) * (sc >> 4).to(tl.float32)
        q = (_u8(base, 16 + (s // 8) * 32 + (s % 2) * 16 + i, mask) >> (2 * ((s // 2) % 4))) & 3
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == Q4_K or QTYPE == Q5_K:  # eight 32-element sub-blocks, 6-bit scale and min
        a = _u8(base, 4 + s % 4, mask)
        m_ = _u8(base, 8 + s % 4, mask)
        md = _u8(base, 12 + s % 4, mask)
        first = s < 4
        sc = tl.where(first, a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30))
        mn = tl.where(first, m_ & 0x3F, (md >> 4) | ((m_ >> 2) & 0x30))
        dl = _f16(base, 0, mask) * sc.to(tl.float32)
        ml = _f16(base, 2, mask) * mn.to(tl.float32)
        if QTYPE == Q4_K:
            q = (_u8(base, 16 + (s // 2) * 32 + i, mask) >> (4 * (s % 2))) & 0xF
        else:
            q = (_u8(base, 48 + (s // 2) * 32 + i, mask) >> (4 * (s % 2))) & 0xF
            q = q | (((_u8(base, 16 + i, mask) >> s) & 1) << 4)
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == IQ4_NL:  # in the fused kernel only: the dequant kernel takes _iq4_nl_store
        code = (_u8(base, 2 + i, mask) >> (4 * s)) & 0xF
        v = _f16(base, 0, mask) * _iq4_regs(code)
    else:
        tl.static_assert(False, "no decoding for this QTYPE: add it here (see formats.py)")
    return v, b * QK + s * SUB + i, mask


_tables: dict[torch.device, torch.Tensor] = {}


def lookup_table(device: torch.device) -> torch.Tensor:
    """The IQ4 code values on ``device`` (made once: the per-layer path launches no copies)."""
    table = _tables.get(device)
    if table is None:
        table = _tables[device] = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=device)
    return table


@functools.cache
def _warn_misaligned() -> None:
    log.warning("GGUF blocks at an address off the alignment their type's kernels read at: each dequant copies "
                "them first (slower)")


def aligned(raw: torch.Tensor, align: int = 8) -> torch.Tensor:
    """``raw``, or where it starts off an ``align``-byte boundary (a view into a larger buffer) a copy
    that does not. Traced code (torch.compile) has no addresses: there ``raw`` is taken as it is."""
    if torch.compiler.is_compiling() or raw.data_ptr() % align == 0:
        return raw
    _warn_misaligned()
    return raw.clone()


@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


class Dequantizer:
    """The dequant kernel bound to one weight: its format's tile for the GPU, the grid, the launch
    constants and what Triton specializes on that stays (the block count), all worked out once (when
    the layer is loaded), since the call runs per layer per step on a host-bound path.
    ``Dequantizer(fmt, shape, device)(raw, dtype)`` is the weight."""

    def __init__(self, fmt: type[BlockFormat], shape, device: torch.device, tile=None):
        self.shape = torch.Size(shape)
        if tile is None and device.type == "cuda":
            tile = fmt.tile_for(device_name(device.index if device.index is not None else torch.cuda.current_device()))
        tile = tile or fmt.tile
        self.n_blocks = self.shape.numel() // fmt.block_size
        self.grid = ((self.n_blocks + tile.blocks - 1) // tile.blocks, 1, 1)
        self.align, self.table = fmt.align, fmt.table
        self.launch = _launcher(fmt, tile)
        self.blocks_key = int_key(self.n_blocks)

    def __call__(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype, device=raw.device)
        if torch.compiler.is_compiling():
            self.launch(self.grid, raw, out, lookup_table(raw.device) if self.table else raw, self.n_blocks)
            return out
        address = raw.data_ptr()
        if address % self.align:
            raw = aligned(raw, self.align)
            address = raw.data_ptr()
        # The output is a fresh allocation (aligned), the table too: what varies is the bytes'
        # alignment, the dtype and the device. Only the IQ4 types read the table (on the bytes'
        # device: a model may be copied to another GPU); the others get any pointer (the bytes).
        self.launch.keyed((self.blocks_key, dtype, address % 16 == 0, raw.get_device()), self.grid, raw, out,
                          lookup_table(raw.device) if self.table else raw, self.n_blocks)
        return out


def dequantize_cuda(raw: torch.Tensor, fmt: type[BlockFormat], shape, dtype: torch.dtype, tile=None) -> torch.Tensor:
    """Dequantize the contiguous uint8 blocks ``raw`` (on a CUDA device) to ``dtype`` of ``shape``, once
    (a layer binds a Dequantizer instead)."""
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    return Dequantizer(fmt, shape, raw.device, tile)(raw.contiguous(), dtype)


@functools.lru_cache(maxsize=None)
def _launcher(fmt: type[BlockFormat], tile) -> Launcher:
    return Launcher(_kernel, QTYPE=int(fmt.qtype), QK=fmt.block_size, TS=fmt.type_size, R=tile.blocks,
                    NSUB=tile.nsub, num_warps=tile.num_warps, enable_fp_fusion=False)
