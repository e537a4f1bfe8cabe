"""Round-to-nearest encoders of the K-quants, for writing GGUF files: fixtures, benchmarks and small
conversions (the registry, ``formats``, names each type's encoder).

The ``gguf`` package quantizes F16/BF16 and the 32-element types but no K-quant, and real Qwen-Image
files are mostly K-quants, so Q4_K, Q5_K and Q6_K are encoded here (plain min/max rounding, not
llama.cpp's error-minimising search: the bytes are valid blocks, the quality is not the point).
Each encoder takes float32 rows of one 256-element block and returns the blocks' bytes.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _split_scale(values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """One f16 super-scale per block and integer sub-scales in [0, limit] whose product tracks ``values``."""
    d = (values.max(axis=-1, keepdims=True) / limit).astype(np.float16)
    codes = np.clip(np.rint(_safe_div(values, d.astype(np.float32))), 0, limit).astype(np.uint8)
    return d, codes


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins into the 12 bytes Q4_K/Q5_K use."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of Q4_K and Q5_K: 8 sub-blocks of 32 with a scale and a min each."""
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    step = (sub.max(axis=-1) - lo) / levels
    d, sc = _split_scale(step, 63)
    dmin, mn = _split_scale(-lo, 63)
    scale = d.astype(np.float32) * sc
    offset = dmin.astype(np.float32) * mn
    q = np.clip(np.rint(_safe_div(sub + offset[..., None], np.broadcast_to(scale[..., None], sub.shape))), 0, levels)
    head = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_k_scales(sc, mn)], axis=-1)
    return head, q.astype(np.uint8), sc, mn


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes -> (n, 128) bytes: sub-block 2c in the low nibbles of chunk c, 2c+1 in the high."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)


def q4_k(x: np.ndarray) -> np.ndarray:
    head, q, _, _ = _affine_k(x, 15)
    return np.concatenate([head, _nibble_pack(q)], axis=-1)


def q5_k(x: np.ndarray) -> np.ndarray:
    head, q, _, _ = _affine_k(x, 31)
    bits = (q >> 4) & 1                                   # (n, 8, 32): bit j of qh byte i is sub-block j
    qh = (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _nibble_pack(q)], axis=-1)


def q6_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    amax = np.abs(sub).max(axis=-1)
    d = (amax.max(axis=-1, keepdims=True) / 31 / 127).astype(np.float16)
    sc = np.clip(np.rint(_safe_div(amax / 31, d.astype(np.float32))), 0, 127).astype(np.int8)
    step = d.astype(np.float32) * sc
    q = np.clip(np.rint(_safe_div(sub, np.broadcast_to(step[..., None], sub.shape))), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 128)           # two halves of 128 elements
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)], axis=-1)
