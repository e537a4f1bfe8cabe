"""Encoders of the GGUF block types, for writing GGUF files (the registry, ``formats``, names each
type's).

The ``gguf`` package quantizes F16/BF16 and the 32-element types but no K-quant or IQ4 type, and
real Qwen-Image files are mostly K-quants. The encoders here follow llama.cpp's reference quantizers
operation for operation in float32, as ``ggml_quantize_chunk`` calls them without an importance
matrix (``quantize_row_*_ref``; ``quantize_iq4_nl`` / ``quantize_iq4_xs``), so their bytes are
llama.cpp's: Q2_K to Q6_K, IQ4_NL, IQ4_XS, and Q4_0, Q4_1, Q5_0, Q5_1, where the ``gguf`` package's
differ on all-zero blocks.
Each encoder takes float32 rows of whole blocks and returns the blocks' bytes.

Matching llama.cpp bit for bit takes its arithmetic as written: every sum accumulated element after
element (numpy's own sums are pairwise), every product and sum rounded to float32 on its own (no
fused multiply-add; numpy fuses none), and its rounding (``nearest_int``: to nearest, ties to even).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
# Below this largest magnitude llama.cpp takes a group as all zeros.
GROUP_MAX_EPS = F32(1e-15)
# The IQ4 types' 16 code values (llama.cpp's kvalues_iq4nl), in increasing order.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _at(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The value at ``index`` of each row (argmin / argmax give the first of equal values, as C's
    running comparisons keep it: a -0.0 stays -0.0)."""
    return x[np.arange(len(x)), index]


def _c_int(v: np.ndarray) -> np.ndarray:
    """C's conversion of a float to an integer type: toward zero."""
    return np.trunc(v).astype(np.int64)


def _halves(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """32-element blocks' codes as the nibble bytes (element j low, j + 16 high) and the 5th bits."""
    qs = ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).astype(np.uint8)
    bits = (q >> 4) & 1
    qh = (bits.astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qs, qh.astype("<u4")[:, None].view(np.uint8)


def _symmetric(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0 (``half`` 8 / 16), llama.cpp's reference: d = (signed peak) / -half, codes
    truncated from x * (1 / d) + half + 0.5 and capped at 2 * half - 1."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)
    # The running maximum starts from +0.0 and moves only to a larger magnitude: all zeros give +0.0.
    peak = _at(x, np.abs(x).argmax(axis=-1))
    d = np.where(peak == 0, F32(0), peak) / F32(-half)
    inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    q = np.minimum(2 * half - 1, _c_int(x * inv[:, None] + F32(half + 0.5)))
    return d.astype(np.float16)[:, None].view(np.uint8), q


def _affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 (``levels`` 15 / 31), llama.cpp's reference: d = (max - min) / levels, codes
    truncated from (x - min) * (1 / d) + 0.5."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)
    lo = _at(x, x.argmin(axis=-1))
    d = (_at(x, x.argmax(axis=-1)) - lo) / F32(levels)
    inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    q = _c_int((x - lo[:, None]) * inv[:, None] + F32(0.5))
    q = np.minimum(levels, q) if levels == 15 else q & 0xFF
    head = np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), lo.astype(np.float16)[:, None].view(np.uint8)],
                          axis=-1)
    return head, q


def _blocks32(head: np.ndarray, q: np.ndarray, fifth_bit: bool) -> np.ndarray:
    qs, qh = _halves(q)
    return np.concatenate([head, qh, qs] if fifth_bit else [head, qs], axis=-1)


def q4_0(x: np.ndarray) -> np.ndarray:
    return _blocks32(*_symmetric(x, 8), fifth_bit=False)


def q5_0(x: np.ndarray) -> np.ndarray:
    return _blocks32(*_symmetric(x, 16), fifth_bit=True)


def q4_1(x: np.ndarray) -> np.ndarray:
    return _blocks32(*_affine(x, 15), fifth_bit=False)


def q5_1(x: np.ndarray) -> np.ndarray:
    return _blocks32(*_affine(x, 31), fifth_bit=True)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins into the 12 bytes Q4_K/Q5_K use."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out



def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """The sum over the last axis accumulated in order, in float32 (as a C loop does)."""
    total = terms[..., 0].copy()
    for i in range(1, terms.shape[-1]):
        total += terms[..., i]
    return total


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool = False):
    """llama.cpp's ``make_qkx2_quants`` on each row of ``x`` (weights ``w``): the codes (0..nmax),
    the scale and the (negated) minimum that fit the row best in weighted squared error (absolute
    error where ``mad``), searched over ``nstep`` + 1 candidate scales around min/max rounding."""
    def loss(diff):
        return np.abs(diff) if mad else diff * diff

    nmax_f = F32(nmax)
    lo = np.minimum(x.min(axis=-1), F32(0))
    hi = x.max(axis=-1)
    flat = hi == lo
    hi = np.where(flat, lo + F32(1), hi)  # flat rows end as zeros; this only keeps their arithmetic finite
    span = hi - lo
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    iscale = nmax_f / span
    scale = F32(1) / iscale
    codes = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(F32)
    diff = scale[:, None] * codes + lo[:, None] - x
    best = _seq_sum(w * loss(diff))
    for step in range(nstep + 1):
        # llama.cpp measures the span from the best minimum so far.
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (hi - lo)
        aux = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(F32)
        wl = w * aux
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * aux), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale)
        diff = this_scale[:, None] * aux + this_min[:, None] - x
        error = _seq_sum(w * loss(diff))
        better = ok & (error < best)
        codes = np.where(better[:, None], aux, codes)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    codes = np.where(flat[:, None], F32(0), codes)
    scale = np.where(flat, F32(0), scale)
    return codes, scale, -lo


def _affine_k(x: np.ndarray, levels: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared part of Q4_K and Q5_K (llama.cpp's reference): 8 sub-blocks of 32 with a 6-bit scale
    and min each under two f16 super-scales; returns the blocks' 16-byte heads and the codes."""
    x = np.ascontiguousarray(x, dtype=F32)
    sub = x.reshape(-1, 32)
    # Weights of the search: the sub-block's RMS plus each value's magnitude.
    av = np.sqrt(_seq_sum(sub * sub) / F32(32))
    codes, scales, mins = _qkx2(sub, av[:, None] + np.abs(sub), levels, rmin, 0.1, nstep)
    codes, scales, mins = codes.reshape(-1, 8, 32), scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
    # Rounded to an int, kept as a byte (a negative scale wraps, as in C), then capped at 63.
    sc = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    mn = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    step = d.astype(F32)[:, None] * sc.astype(F32)
    offset = dmin.astype(F32)[:, None] * mn.astype(F32)
    # Sub-blocks whose scale rounds to zero keep the search's codes.
    live = step != 0
    q = np.rint((x.reshape(-1, 8, 32) + offset[..., None]) / np.where(live, step, F32(1))[..., None])
    codes = np.where(live[..., None], np.clip(q, 0, levels), codes)
    head = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_k_scales(sc, mn)], axis=-1)
    return head, codes.astype(np.uint8)


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes -> (n, 128) bytes: sub-block 2c in the low nibbles of chunk c, 2c+1 in the high."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)


def _pack_2bit(codes: np.ndarray) -> np.ndarray:
    """256 two-bit codes per block as 64 bytes: byte l of each half of 128 holds elements l, l+32,
    l+64 and l+96 of that half, lowest bits first."""
    c = codes.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def q2_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``quantize_row_q2_K_ref``: 16 sub-blocks of 16, 4-bit scale and min each."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    sub = x.reshape(-1, 16)
    codes, scales, mins = _qkx2(sub, np.abs(sub), 3, -0.5, 0.1, 15, mad=True)
    codes, scales, mins = codes.reshape(-1, 16, 16), scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    live_s, live_m = max_scale > 0, max_min > 0
    # Rounded to an int and stored into a byte as C does (no clamp: a negative value wraps).
    sc = np.where(live_s[:, None], np.rint((F32(15) / np.where(live_s, max_scale, F32(1)))[:, None] * scales), 0)
    mn = np.where(live_m[:, None], np.rint((F32(15) / np.where(live_m, max_min, F32(1)))[:, None] * mins), 0)
    byte = ((sc.astype(np.int64) & 0xFF) | ((mn.astype(np.int64) << 4) & 0xFF)).astype(np.uint8)
    d = np.where(live_s, max_scale / F32(15), F32(0)).astype(np.float16)
    dmin = np.where(live_m, max_min / F32(15), F32(0)).astype(np.float16)
    step = d.astype(F32)[:, None] * (byte & 0xF).astype(F32)
    offset = dmin.astype(F32)[:, None] * (byte >> 4).astype(F32)
    live = step != 0  # sub-blocks whose scale rounds to zero keep the search's codes
    q = np.rint((x.reshape(-1, 16, 16) + offset[..., None]) / np.where(live, step, F32(1))[..., None])
    codes = np.where(live[..., None], np.clip(q, 0, 3), codes)
    return np.concatenate([byte, _pack_2bit(codes), d[:, None].view(np.uint8), dmin[:, None].view(np.uint8)],
                          axis=-1)


def _q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``make_q3_quants`` (with its refinement) on each row of ``x``: codes in
    0..2*nmax-1 and the signed scale; each element's code is revisited in turn, up to five passes,
    while a change lowers the weighted error."""
    n = x.shape[-1]
    rows = np.arange(len(x))
    peak = x[rows, np.abs(x).argmax(axis=-1)]
    zero = np.abs(peak) < GROUP_MAX_EPS
    iscale = F32(-nmax) / np.where(zero, F32(1), peak)
    levels = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * levels), _seq_sum(w * levels * levels)
    active = ~zero
    for _ in range(5):
        changed = np.zeros(len(x), dtype=bool)
        for i in range(n):
            li = levels[:, i]
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            fits = active & (slx > 0)
            new = np.clip(np.rint(x[:, i] * sl2 / np.where(fits, slx, F32(1))), -nmax, nmax - 1).astype(F32)
            slx = slx + wx[:, i] * new
            sl2 = sl2 + w[:, i] * new * new
            take = fits & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    codes = np.where(zero[:, None], F32(0), levels + F32(nmax))
    return codes, np.where(zero, F32(0), scale)


def _sub_blocks_of_16(x: np.ndarray, search, nmax: int):
    """Blocks of 256 searched as 16 sub-blocks of 16 (``search``: _q3 or _qx): the blocks, the codes
    (n, 16, 16), the scales (n, 16) and each block's first scale of the largest magnitude."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    codes, scales = search(x.reshape(-1, 16), nmax)
    codes, scales = codes.reshape(-1, 16, 16), scales.reshape(-1, 16)
    return x, codes, scales, scales[np.arange(len(x)), np.abs(scales).argmax(axis=-1)]


def q3_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``quantize_row_q3_K_ref``: 16 sub-blocks of 16, 6-bit signed scales under one f16."""
    x, codes, scales, peak = _sub_blocks_of_16(x, _q3, 4)
    live_block = peak != 0
    iscale = F32(-32) / np.where(live_block, peak, F32(1))
    # Rounded to an int, kept as an int8 (wrapping, as C's cast does), clamped to -32..31, then +32.
    sc = np.rint(iscale[:, None] * scales).astype(np.int64)
    sc = np.clip(((sc + 128) & 0xFF) - 128, -32, 31) + 32
    sc = np.where(live_block[:, None], sc, 32)
    d = np.where(live_block, F32(1) / iscale, F32(0)).astype(np.float16)
    packed = np.zeros((len(x), 12), dtype=np.uint8)
    packed[:, :8] = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= ((sc[:, j] >> 4) << (2 * (j // 4))).astype(np.uint8)
    packed = np.where(live_block[:, None], packed, 0).astype(np.uint8)
    step = d.astype(F32)[:, None] * (sc - 32).astype(F32)
    live = step != 0  # sub-blocks whose scale rounds to zero keep the search's codes
    q = np.clip(np.rint(x.reshape(-1, 16, 16) / np.where(live, step, F32(1))[..., None]), -4, 3) + F32(4)
    codes = np.where(live[..., None], q, codes).astype(np.uint8).reshape(-1, QK_K)
    high = codes > 3  # element j's third bit: bit j // 32 of mask byte j % 32
    hmask = (high.reshape(-1, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(
        axis=1, dtype=np.uint8)
    return np.concatenate([hmask, _pack_2bit(np.where(high, codes - 4, codes)), packed, d[:, None].view(np.uint8)],
                          axis=-1)


def q4_k(x: np.ndarray) -> np.ndarray:
    head, q = _affine_k(x, 15, -1.0, 20)
    return np.concatenate([head, _nibble_pack(q)], axis=-1)


def q5_k(x: np.ndarray) -> np.ndarray:
    head, q = _affine_k(x, 31, -0.5, 15)
    bits = (q >> 4) & 1                                   # (n, 8, 32): bit j of qh byte i is sub-block j
    qh = (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _nibble_pack(q)], axis=-1)



def _qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qx_quants`` (weights x², no importance) on each row of ``x``: codes in
    0..2*nmax-1 and the signed scale, searched over 18 scales around the one fitting the row's
    largest magnitude."""
    rows = np.arange(len(x))
    peak = x[rows, np.abs(x).argmax(axis=-1)]  # the first value of the largest magnitude, with its sign
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x

    def fit(iscale):
        levels = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return levels, _seq_sum(w * x * levels), _seq_sum(w * levels * levels)

    levels, sumlx, suml2 = fit(F32(-nmax) / peak)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        cand, lx, l2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
        better = (l2 > 0) & (lx * lx > best * l2)
        levels = np.where(better[:, None], cand, levels)
        scale = np.where(better, lx / np.where(l2 > 0, l2, F32(1)), scale)
        best = np.where(better, scale * lx, best)
    codes = np.where(zero[:, None], F32(0), levels + F32(nmax))
    return codes, np.where(zero, F32(0), scale)


def q6_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``quantize_row_q6_K_ref``: 16 sub-blocks of 16, 8-bit signed scales under one f16."""
    x, codes, scales, peak = _sub_blocks_of_16(x, _qx, 32)
    empty = np.abs(peak) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(empty, F32(1), peak)
    d = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
    sc = np.where(empty[:, None], 0, np.minimum(np.rint(iscale[:, None] * scales), 127)).astype(np.int8)
    step = d.astype(F32)[:, None] * sc.astype(F32)
    live = step != 0  # sub-blocks whose scale rounds to zero keep the search's codes
    q = np.clip(np.rint(x.reshape(-1, 16, 16) / np.where(live, step, F32(1))[..., None]), -32, 31) + F32(32)
    q = np.where(live[..., None], q, codes)
    q = np.where(empty[:, None, None], F32(0), q).astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    qh = np.where(empty[:, None, None], 0, qh).astype(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d[:, None].view(np.uint8)],
                          axis=-1)


_IQ4 = np.array(IQ4_VALUES, dtype=F32)
# How many candidate scales either side of the first the IQ4 search tries (ggml_quantize_chunk's 7).
IQ4_TRIES = 7


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``best_index_int8``: the nearest code value's index (a tie to the upper one)."""
    upper = np.clip(np.searchsorted(_IQ4, v, side="right"), 1, 15)
    nearer_lower = (v - _IQ4[upper - 1]) < (_IQ4[upper] - v)
    return np.where(v <= _IQ4[0], 0, np.where(v >= _IQ4[15], 15, np.where(nearer_lower, upper - 1, upper)))


def _iq4_scales(x: np.ndarray) -> np.ndarray:
    """The scale of each row of 32 that llama.cpp's ``quantize_row_iq4_nl_impl`` searches for (weights
    x², no importance; 0 for an all-zero row)."""
    rows = np.arange(len(x))
    peak = x[rows, np.abs(x).argmax(axis=-1)]
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x

    def fit(inverse):
        q = _IQ4[_iq4_index(inverse[:, None] * x)]
        wq = w * q
        return _seq_sum(wq * x), _seq_sum(wq * q)

    sumqx, sumq2 = fit(F32(1) / (-peak / _IQ4[0]))
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0))
    best = d * sumqx
    for step in range(-IQ4_TRIES, IQ4_TRIES + 1):
        sumqx, sumq2 = fit(F32(step + IQ4_VALUES[0]) / peak)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / np.where(better, sumq2, F32(1)), d)
        best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d)


def _iq4_pack(codes: np.ndarray) -> np.ndarray:
    """Codes of 32-element runs as 16 bytes each: element j low nibble, j + 16 high."""
    c = codes.reshape(-1, 2, 16).astype(np.uint8)
    return (c[:, 0] | (c[:, 1] << 4)).reshape(len(codes), -1)


def iq4_nl(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``quantize_iq4_nl`` (no importance matrix): one f16 scale per 32."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)
    d = _iq4_scales(x)
    inverse = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    codes = _iq4_index(inverse[:, None] * x)
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), _iq4_pack(codes)], axis=-1)


def iq4_xs(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``quantize_iq4_xs`` (no importance matrix): 6-bit scales of 32 under one f16."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    scales = _iq4_scales(x.reshape(-1, 32)).reshape(-1, 8)
    peak = scales[np.arange(len(x)), np.abs(scales).argmax(axis=-1)]
    peak = np.where(peak == 0, F32(0), peak)  # the running maximum starts from +0.0
    d = -peak / F32(32)
    inverse = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    levels = np.clip(np.rint(inverse[:, None] * scales), -32, 31)
    step = d[:, None] * levels  # from the unrounded d, as llama.cpp does
    inv_step = np.where(step != 0, F32(1) / np.where(step != 0, step, F32(1)), F32(0))
    codes = _iq4_index(inv_step[..., None] * x.reshape(-1, 8, 32)).reshape(-1, 32)
    ls = (levels + 32).astype(np.uint8)
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = ((ls >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), scales_h.astype("<u2")[:, None].view(np.uint8),
                           scales_l, _iq4_pack(codes).reshape(len(x), -1)], axis=-1)
