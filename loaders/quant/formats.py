"""The quant-type registry: one class per GGUF block type, owning everything the package does with it.

A class holds its block layout (elements and bytes per block), its torch dequantizer, how the Triton
dequant kernel splits its blocks (``tile``, per-GPU ``gpu_tiles``; no tile: no kernel), whether the
fused matmul kernel takes it, the alignment its kernels' wide loads need, and its encoder (for
writing files). Adding a type is one class here plus its decoding in ``kernels``. FP8 rows, the
format the fp8 mode requantizes to, is registered the same way in ``fp8``.

The torch dequantizers turn a ``(n_blocks, type_size)`` uint8 tensor into ``(n_blocks, block_size)``
float32 values on the tensor's own device. Their arithmetic follows ggml's reference order (scale
products first, then the code), so the fp32 results equal the ``gguf`` package's numpy dequantizer
bit for bit; the caller casts to the compute dtype. Shift and lookup constants are cached per device
so the per-layer path launches no host-to-device copies.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ClassVar, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import encode
from .kernels.tiles import Tile

QK_K = encode.QK_K

IQ4_VALUES = encode.IQ4_VALUES


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


class Format:
    """A storage format of a weight: how its bytes are laid out, decoded and encoded."""

    name: ClassVar[str]
    qtype: ClassVar[T | None] = None
    # Alignment (bytes) the kernels' widest loads need of a tensor's first block.
    align: ClassVar[int] = 1
    # The Triton dequant kernel's split of the blocks (None: no kernel, the torch path runs it), and
    # other splits for GPUs whose own sweep found better ones, by a whole word of the device's name
    # ("H200" is not a GH200, which nobody swept).
    tile: ClassVar[Tile | None] = None
    gpu_tiles: ClassVar[Mapping[str, Tile]] = {}
    # Whether the fused matmul kernel (few rows of input, large weight) beats dequant + cuBLAS for it.
    fused: ClassVar[bool] = False
    # Whether its kernels read the IQ4 code table.
    table: ClassVar[bool] = False
    # float32 blocks (and, with ``weighting``, each element's search weight) -> their bytes, one row
    # per block, on the blocks' device (None: this package cannot write it).
    encoder: ClassVar[Callable[..., torch.Tensor] | None] = None
    # How llama.cpp weights its search by an importance matrix (None: the type ignores one).
    weighting: ClassVar[encode.Weighting | None] = None

    @classmethod
    def tile_for(cls, device_name: str | None) -> Tile:
        """The dequant kernel's tile on the GPU named ``device_name`` (None: the default)."""
        words = device_name.split() if device_name else []
        return next((tile for word, tile in cls.gpu_tiles.items() if word in words), cls.tile)

    @classmethod
    def dequantize(cls, raw: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """The torch path: the contiguous bytes ``raw`` as a ``dtype`` tensor of logical ``shape``."""
        raise NotImplementedError


class BlockFormat(Format):
    """A GGML block type: rows made of blocks of ``block_size`` elements in ``type_size`` bytes."""

    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, qtype: T, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.qtype, cls.name = qtype, qtype.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        FORMATS[qtype] = cls

    @classmethod
    def dequantize(cls, raw, shape, dtype):
        if raw.numel() == 0:  # a zero-element tensor (valid GGUF): no blocks to reshape into
            return torch.empty(shape, dtype=dtype, device=raw.device)
        return cls.dequantize_blocks(raw.reshape(-1, cls.type_size)).reshape(shape).to(dtype)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def encode(cls, x: np.ndarray | torch.Tensor, importance: np.ndarray | torch.Tensor | None = None
               ) -> np.ndarray | torch.Tensor:
        """A float array as this type's blocks, shaped (rows, bytes per row) as GGUFWriter expects: a
        numpy array encoded on the CPU, a tensor on its own device (the same bytes on either).
        ``importance``: an importance matrix's values for the row's columns (llama.cpp's weighted
        search; a type without one ignores it)."""
        if cls.encoder is None:
            raise NotImplementedError(f"this package cannot encode {cls.name}")
        if x.shape[-1] % cls.block_size:
            raise ValueError(f"{cls.name} takes rows of whole {cls.block_size}-element blocks, not rows of {x.shape[-1]}")
        tensor = torch.as_tensor(x)
        rows = tensor.to(torch.float32).reshape(-1, x.shape[-1])
        # Non-finite values are encoded as llama.cpp would (damaged-file fixtures rely on it); a
        # converter refuses them with the name of its input first.
        blocks = rows.reshape(-1, cls.block_size)
        inputs = [blocks]  # and each element's search weight, where an importance matrix is used
        if importance is not None and cls.weighting is not None:
            importance = torch.as_tensor(importance).to(rows.device, torch.float32).reshape(-1)
            if importance.shape[0] != rows.shape[-1]:
                raise ValueError(f"an importance matrix of {importance.shape[0]} columns for rows of {rows.shape[-1]}")
            inputs.append(encode.search_weights(rows, importance, cls.weighting).reshape(-1, cls.block_size))
        step = max(1, ENCODE_PIECE // cls.block_size)
        if blocks.device.type != "cpu" or len(blocks) <= step:
            data = cls.encoder(*inputs)
        else:
            threads = torch.get_num_threads()
            data = torch.cat(list(_encode_pool().map(cls.encoder, *(t.split(step) for t in inputs))))
            # A worker's setting is also the count torch gives threads it meets later: put back.
            torch.set_num_threads(threads)
        data = data.reshape(rows.shape[0], -1)
        return data.numpy() if isinstance(x, np.ndarray) else data


# Blocks encode independently. On the CPU the encoders run several times faster on pieces of this
# many elements than on a whole large tensor (their temporaries stay in cache), and torch releases
# the GIL inside its operations, so the pieces run on every core in threads.
ENCODE_PIECE = 1 << 18


@functools.cache
def _encode_pool() -> ThreadPoolExecutor:
    # torch's own thread count: the cores this process may use, or what the user limited it to. Each
    # worker runs its piece's operations on its own thread: torch's intra-op threads in every worker
    # would put cores x cores threads on the cores.
    return ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="gguf-encode",
                              initializer=torch.set_num_threads, initargs=(1,))


FORMATS: dict[T, type[BlockFormat]] = {}


# Tiles: bench/dequant_bandwidth.py --sweep on an H100 (the best or within 1% of it); Q6_K, IQ4_NL and
# IQ4_XS (word kernels) and the H200 entries from sweeps on an H200 (docs/PERFORMANCE.md).

class Q4_0(BlockFormat, qtype=T.Q4_0):
    tile, fused, encoder = Tile(2, 64), True, encode.q4_0
    weighting = encode.Weighting()

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        q = _nibbles(blocks[:, 2:], 16).reshape(-1, 32).to(torch.int8) - 8
        return d * q.float()


class Q4_1(BlockFormat, qtype=T.Q4_1):
    tile, fused, encoder = Tile(2, 64), True, encode.q4_1
    weighting = encode.Weighting()

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _nibbles(blocks[:, 4:], 16).reshape(-1, 32).float()
        return d * q + m


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian u32 whose bit j is the fifth bit of element j.
    high = _bits(qh, 1, 4).permute(0, 1, 3, 2).reshape(-1, 32)
    return _nibbles(qs, 16).reshape(-1, 32) | (high << 4)


class Q5_0(BlockFormat, qtype=T.Q5_0):
    tile, gpu_tiles, fused, encoder = Tile(2, 64), {"H200": Tile(2, 256, 2)}, True, encode.q5_0
    weighting = encode.Weighting()

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        q = _q5_codes(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
        return d * q.float()


class Q5_1(BlockFormat, qtype=T.Q5_1):
    tile, gpu_tiles, fused, encoder = Tile(2, 64), {"H200": Tile(2, 64, 2)}, True, encode.q5_1
    weighting = encode.Weighting()

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _q5_codes(blocks[:, 4:8], blocks[:, 8:]).float()
        return d * q + m


class Q8_0(BlockFormat, qtype=T.Q8_0):
    tile, fused, encoder = Tile(1, 128), True, encode.q8_0

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        return blocks[:, 2:].contiguous().view(torch.int8).float() * d


class Q2_K(BlockFormat, qtype=T.Q2_K):
    tile, gpu_tiles, fused, encoder = Tile(16, 8), {"H200": Tile(16, 8, 2)}, True, encode.q2_k
    weighting = encode.Weighting(span=QK_K)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _f16(blocks, 80), _f16(blocks, 82)
        dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
        q = _bits(qs, 2, 32).reshape(n, 16, 16).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(BlockFormat, qtype=T.Q3_K):
    tile, gpu_tiles, fused, encoder = Tile(16, 16), {"H200": Tile(16, 8, 2)}, True, encode.q3_k
    weighting = encode.Weighting(span=QK_K, factor=2.0)

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


class Q4_K(BlockFormat, qtype=T.Q4_K):
    tile, fused, encoder = Tile(8, 16), True, encode.q4_k
    weighting = encode.Weighting(span=QK_K, factor=2.0)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _k_scales(blocks)
        q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K(BlockFormat, qtype=T.Q5_K):
    tile, gpu_tiles, fused, encoder = Tile(8, 32), {"H200": Tile(8, 16, 2)}, True, encode.q5_k
    weighting = encode.Weighting(span=QK_K, factor=2.0)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _k_scales(blocks)
        ql = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
        qh = _bits(blocks[:, 16:48], 1, 32).reshape(n, 8, 32)
        q = (ql | (qh << 4)).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q6_K(BlockFormat, qtype=T.Q6_K):
    # The kernels read 2-byte words.
    tile, fused, align, encoder = Tile(16, 16, 8), True, 2, encode.q6_k
    weighting = encode.Weighting(raw=True)

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


class IQ4_NL(BlockFormat, qtype=T.IQ4_NL):
    # Its dequant kernel reads 2-byte words at 95% of the copy bandwidth, and its fused kernel ran
    # 0.88-0.96x of dequant + cuBLAS on every shape the fused rule picks: it takes the dequant path.
    tile, fused, table, align, encoder = Tile(2, 64, 2), False, True, 2, encode.iq4_nl
    weighting = encode.Weighting(span=32, factor=2.0)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        return d * _iq4_lookup(_nibbles(blocks[:, 2:], 16).reshape(-1, 32))


class IQ4_XS(BlockFormat, qtype=T.IQ4_XS):
    # The kernels read d and the scales as one 8-byte load.
    tile, fused, table, align, encoder = Tile(16, 8, 2), True, True, 8, encode.iq4_xs
    weighting = encode.Weighting(span=QK_K, factor=2.0)

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


# The float types a GGUF tensor can be stored in, read as views of the file.
FLOAT_TYPES: dict[T, torch.dtype] = {
    T.F32: torch.float32,
    T.F16: torch.float16,
    T.BF16: torch.bfloat16,
}

KERNEL_FORMATS = tuple(f for f in FORMATS.values() if f.tile is not None)
