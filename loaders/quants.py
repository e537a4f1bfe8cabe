"""Torch dequantizers for GGUF block types, one class per type.

Each class turns a ``(n_blocks, type_size)`` uint8 tensor into ``(n_blocks, block_size)`` float32
values on the tensor's own device. The arithmetic follows ggml's reference order (scale products
first, then the code), so the fp32 results equal the ``gguf`` package's numpy dequantizer bit for
bit; the caller casts to the compute dtype. Shift and lookup constants are cached per device so the
per-layer path launches no host-to-device copies.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@functools.lru_cache(maxsize=None)
def _const(values: tuple, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).reshape(shape)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian f16 at byte ``start`` of every block, as an (n, 1) float32 column."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes into low then high nibbles, per run of ``group`` bytes: (..., k*group) -> (..., k, 2, group)."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, group)
    return (qs >> _const((0, 4), torch.uint8, qs.device, (1, 2, 1))) & 0x0F


def _bits(qh: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """Unpack ``width``-bit fields of each byte, lowest first: (n, k*group) -> (n, k, 8/width, group)."""
    shifts = tuple(range(0, 8, width))
    qh = qh.reshape(qh.shape[0], -1, 1, group)
    return (qh >> _const(shifts, torch.uint8, qh.device, (1, len(shifts), 1))) & ((1 << width) - 1)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the (n, 8, 1) scale and min of each 32-element sub-block, from d, dmin and the
    12-byte field packing 8 six-bit scales and 8 six-bit mins."""
    d, m, m_d = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    n = blocks.shape[0]
    return (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1), (_f16(blocks, 2) * mn.float()).reshape(n, 8, 1)


def _iq4_lookup(codes: torch.Tensor) -> torch.Tensor:
    table = _const(IQ4_VALUES, torch.float32, codes.device, (16,))
    return table[codes.long()]


class QuantType:
    """A GGUF block type: its sizes and how to turn its blocks back into floats."""

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        DEQUANTIZERS[qtype] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


DEQUANTIZERS: dict[GGMLQuantizationType, type[QuantType]] = {}


class Q4_0(QuantType, qtype=GGMLQuantizationType.Q4_0):
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        q = _nibbles(blocks[:, 2:], 16).reshape(-1, 32).to(torch.int8) - 8
        return d * q.float()


class Q4_1(QuantType, qtype=GGMLQuantizationType.Q4_1):
    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _nibbles(blocks[:, 4:], 16).reshape(-1, 32).float()
        return d * q + m


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian u32 whose bit j is the fifth bit of element j.
    high = _bits(qh, 1, 4).permute(0, 1, 3, 2).reshape(-1, 32)
    return _nibbles(qs, 16).reshape(-1, 32) | (high << 4)


class Q5_0(QuantType, qtype=GGMLQuantizationType.Q5_0):
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        q = _q5_codes(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
        return d * q.float()


class Q5_1(QuantType, qtype=GGMLQuantizationType.Q5_1):
    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _q5_codes(blocks[:, 4:8], blocks[:, 8:]).float()
        return d * q + m


class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0):
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        return blocks[:, 2:].contiguous().view(torch.int8).float() * d


class Q2_K(QuantType, qtype=GGMLQuantizationType.Q2_K):
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _f16(blocks, 80), _f16(blocks, 82)
        dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
        q = _bits(qs, 2, 32).reshape(n, 16, 16).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(QuantType, qtype=GGMLQuantizationType.Q3_K):
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        d = _f16(blocks, 108)
        low = _nibbles(scales[:, :8], 8).reshape(n, 16)
        high = _bits(scales[:, 8:12], 2, 4).reshape(n, 16)
        sc = ((low | (high << 4)).to(torch.int8) - 32).float()
        dl = (d * sc).reshape(n, 16, 1)
        ql = _bits(qs, 2, 32).reshape(n, 16, 16)
        # A set hmask bit means "no offset"; a clear one subtracts 4.
        qh = (_bits(hmask, 1, 32).reshape(n, 16, 16)) ^ 1
        q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
        return (dl * q).reshape(n, QK_K)


class Q4_K(QuantType, qtype=GGMLQuantizationType.Q4_K):
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _k_scales(blocks)
        q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K(QuantType, qtype=GGMLQuantizationType.Q5_K):
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _k_scales(blocks)
        ql = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
        qh = _bits(blocks[:, 16:48], 1, 32).reshape(n, 8, 32)
        q = (ql | (qh << 4)).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q6_K(QuantType, qtype=GGMLQuantizationType.Q6_K):
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16(blocks, 208)
        dl = (d * scales).reshape(n, 16, 1)
        low = _nibbles(ql, 64).reshape(n, 8, 32)
        high = _bits(qh, 2, 32).reshape(n, 8, 32)
        q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        return (dl * q).reshape(n, QK_K)


class IQ4_NL(QuantType, qtype=GGMLQuantizationType.IQ4_NL):
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        return d * _iq4_lookup(_nibbles(blocks[:, 2:], 16).reshape(-1, 32))


class IQ4_XS(QuantType, qtype=GGMLQuantizationType.IQ4_XS):
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        d = _f16(blocks, 0)
        scales_h = blocks[:, 2].int() | (blocks[:, 3].int() << 8)
        shifts = _const(tuple(range(0, 16, 2)), torch.int32, blocks.device, (1, 8))
        high = ((scales_h.reshape(n, 1) >> shifts) & 0x03).to(torch.uint8)
        low = _nibbles(blocks[:, 4:8], 1).reshape(n, 8)
        sc = ((low | (high << 4)).to(torch.int8) - 32).float()
        dl = (d * sc).reshape(n, 8, 1)
        q = _iq4_lookup(_nibbles(blocks[:, 8:], 16).reshape(n, 8, 32))
        return (dl * q).reshape(n, QK_K)


FLOAT_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
