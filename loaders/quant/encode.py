"""Encoders of the GGUF block types, for writing GGUF files (the registry, ``formats``, names each
type's), in torch: the same code runs on the CPU and on a GPU.

The ``gguf`` package quantizes F16/BF16 and the 32-element types but no K-quant or IQ4 type, and
real Qwen-Image files are mostly K-quants. The encoders here follow llama.cpp's reference quantizers
operation for operation in float32, as ``ggml_quantize_chunk`` calls them, so their bytes are
llama.cpp's: Q2_K to Q6_K, IQ4_NL, IQ4_XS, Q8_0, and Q4_0, Q4_1, Q5_0, Q5_1, where the ``gguf``
package's differ on all-zero blocks. Without an importance matrix that is ``quantize_row_*_ref``
(``quantize_iq4_nl`` / ``quantize_iq4_xs``); with one, the weighted searches of its
``quantize_row_*_impl``, whose weights ``search_weights`` forms by each type's ``Weighting``.
Each encoder takes a float32 tensor of rows of whole blocks, and optionally each element's search
weight, and returns the blocks' bytes (uint8, one row per block) on the same device.

Matching llama.cpp bit for bit takes its arithmetic as written: every sum accumulated element after
element (torch's own reductions reorder), every product and sum rounded to float32 on its own, and
its rounding (``nearest_int``: to nearest, ties to even; ``roundf``: ties away from zero). Each
torch operation here is one elementwise kernel or an indexing one, so nothing is fused into a
multiply-add on any device (torch.compile would fuse them: these functions are never compiled), and
only operations rounded once are used (add, multiply, divide, square root, comparisons, rounding;
``_div`` and ``_sqrt`` say where torch's own need care).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..compat import triton_kernels

QK_K = 256
F32 = np.float32  # constants are computed as float32 scalars, as C's float literals
# Below this largest magnitude llama.cpp takes a group as all zeros.
GROUP_MAX_EPS = float(F32(1e-15))
# The IQ4 types' 16 code values (llama.cpp's kvalues_iq4nl), in increasing order.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Weighting:
    """How a type's llama.cpp quantizer turns an importance matrix (one value per column) into the
    weights of its search: importance × sqrt(sigma2 + x²), with sigma2 ``factor`` × the mean square
    of the ``span`` elements around x (0: its whole row); ``raw``: the importance alone."""
    span: int = 0
    factor: float = 1.0
    raw: bool = False


def search_weights(rows: torch.Tensor, importance: torch.Tensor, rule: Weighting) -> torch.Tensor:
    """Each element's search weight (``rows``: float32 (n, row length); ``importance``: the row
    length's values), as llama.cpp computes them in float32."""
    if rule.raw:
        return importance.expand_as(rows)
    if rule.span:
        spans = rows.reshape(-1, rule.span)
        sigma2 = _div(_seq_sum(spans * spans) * rule.factor, float(rule.span))
        sigma2 = sigma2.reshape(len(rows), -1).repeat_interleave(rule.span, dim=-1)
    else:
        sigma2 = _div(_seq_sum(rows * rows) * rule.factor, float(rows.shape[-1]))[:, None]
    return importance * _sqrt(sigma2 + rows * rows)


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The value at ``index`` of each row (argmin / argmax give the first of equal values, as C's
    running comparisons keep it: a -0.0 stays -0.0)."""
    return x.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _peak(x: torch.Tensor) -> torch.Tensor:
    """Each row's first value of the largest magnitude, with its sign."""
    return _at(x, x.abs().argmax(dim=-1))


def _div(num: torch.Tensor | float, den: torch.Tensor | float) -> torch.Tensor:
    """num / den, rounded once. torch divides a tensor by a Python number, and a Python number by a
    tensor, through a reciprocal on some devices (CUDA): a number goes in as a tensor here instead."""
    like = den if isinstance(den, torch.Tensor) else num
    return torch.div(*(v if isinstance(v, torch.Tensor) else like.new_full((), v) for v in (num, den)))


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded: torch's float32 square root on the CPU is not (its vector
    library's is within an ulp), and a float64 square root rounded to float32 is."""
    return v.double().sqrt().float()


def _running_max(v: torch.Tensor) -> torch.Tensor:
    """Each row's largest value as C's running maximum from 0 finds it: +0.0 unless one is larger
    (a -0.0 minimum must not become the block's -0.0 scale)."""
    m = v.amax(dim=-1)
    return torch.where(m > 0, m, 0.0)


def _recip(v: torch.Tensor) -> torch.Tensor:
    """1 / v, and 0 where v is 0 (llama.cpp's ``d ? 1.0f/d : 0.0f``)."""
    nonzero = v != 0
    return torch.where(nonzero, _div(1.0, torch.where(nonzero, v, 1.0)), 0.0)


def _safe_div(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor, otherwise) -> torch.Tensor:
    """num / den where ``ok``, else ``otherwise`` (the division never sees a zero)."""
    return torch.where(ok, _div(num, torch.where(ok, den, 1.0)), otherwise)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), exact in float32."""
    a = v.abs()
    floored = a.floor()
    return torch.sign(v) * (floored + (2.0 * (a - floored)).floor())


def _c_int(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of a float to an integer type: toward zero."""
    return v.trunc().to(torch.int64)


def _bytes_of(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each value of the 1-D ``v`` stored as ``dtype`` (little-endian), as a row of bytes."""
    return v.to(dtype).unsqueeze(-1).contiguous().view(torch.uint8)


@functools.cache
def _gpu_seq_sum() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The Triton kernel summing in order on a GPU in one launch (None where the kernels do not run:
    then one torch add per term)."""
    if not triton_kernels():
        return None
    from .kernels.seq_sum import seq_sum
    return seq_sum


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """The sum over the last axis accumulated in order, in float32 (as a C loop does)."""
    kernel = _gpu_seq_sum() if terms.is_cuda else None
    if kernel is not None:
        return kernel(terms)
    # Term by term over contiguous columns: each add is one vectorised pass, not a strided gather.
    columns = terms.movedim(-1, 0).contiguous()
    total = columns[0].clone()
    for column in columns[1:]:
        total += column
    return total


def _bits(values: torch.Tensor, dim: int, width: int = 1) -> torch.Tensor:
    """Small integers along ``dim`` packed into one integer, ``width`` bits each, the first lowest."""
    values = values.movedim(dim, -1).to(torch.int64)
    return (values << (width * torch.arange(values.shape[-1], device=values.device))).sum(dim=-1)


def _halves(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32-element blocks' codes as the nibble bytes (element j low, j + 16 high) and the 5th bits."""
    qs = ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).to(torch.uint8)
    qh = _bits((q >> 4) & 1, -1)
    return qs, _bytes_of(qh, torch.int32)


def _symmetric(x: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0 (``half`` 8 / 16), llama.cpp's reference: d = (signed peak) / -half, codes
    truncated from x * (1 / d) + half + 0.5 and capped at 2 * half - 1."""
    x = x.reshape(-1, 32)
    # The running maximum starts from +0.0 and moves only to a larger magnitude: all zeros give +0.0.
    peak = _peak(x)
    d = _div(torch.where(peak == 0, 0.0, peak), float(-half))
    q = torch.clamp(_c_int(x * _recip(d)[:, None] + (half + 0.5)), max=2 * half - 1)
    return _bytes_of(d, torch.float16), q


def _affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1 (``levels`` 15 / 31), llama.cpp's reference: d = (max - min) / levels, codes
    truncated from (x - min) * (1 / d) + 0.5."""
    x = x.reshape(-1, 32)
    lo = _at(x, x.argmin(dim=-1))
    d = _div(_at(x, x.argmax(dim=-1)) - lo, float(levels))
    q = _c_int((x - lo[:, None]) * _recip(d)[:, None] + 0.5)
    q = torch.clamp(q, max=levels) if levels == 15 else q & 0xFF
    return torch.cat([_bytes_of(d, torch.float16), _bytes_of(lo, torch.float16)], dim=-1), q


def _blocks32(head: torch.Tensor, q: torch.Tensor, fifth_bit: bool) -> torch.Tensor:
    qs, qh = _halves(q)
    return torch.cat([head, qh, qs] if fifth_bit else [head, qs], dim=-1)


def q4_0(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return _blocks32(*(_symmetric(x, 8) if w is None else _weighted_symmetric(x, 8, w)), fifth_bit=False)


def q5_0(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return _blocks32(*(_symmetric(x, 16) if w is None else _weighted_symmetric(x, 16, w)), fifth_bit=True)


def q4_1(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return _blocks32(*(_affine(x, 15) if w is None else _weighted_affine(x, 15, w)), fifth_bit=False)


def q5_1(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return _blocks32(*(_affine(x, 31) if w is None else _weighted_affine(x, 31, w)), fifth_bit=True)


def _weighted_symmetric(x: torch.Tensor, half: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0 with search weights (llama.cpp's ``quantize_row_q4_0_impl``): the signed scale
    of ``make_qx_quants``' search, its codes kept as found."""
    codes, d = _qx(x.reshape(-1, 32), half, w.reshape(-1, 32))
    return _bytes_of(d, torch.float16), codes.to(torch.int64)


def _weighted_affine(x: torch.Tensor, levels: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1 with search weights (llama.cpp's ``quantize_row_q4_1_impl``): scale and minimum of
    ``make_qkx3_quants``' search, its codes kept as found."""
    codes, d, neg_min = _qkx2(x.reshape(-1, 32), w.reshape(-1, 32), levels, -0.9, 0.05, 36)
    return torch.cat([_bytes_of(d, torch.float16), _bytes_of(-neg_min, torch.float16)], dim=-1), codes.to(torch.int64)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``quantize_row_q8_0_ref``: d = max |x| / 127, codes roundf(x / d)."""
    x = x.reshape(-1, 32)
    d = _div(x.abs().amax(dim=-1), 127.0)
    q = _roundf(x * _recip(d)[:, None]).to(torch.int8)
    return torch.cat([_bytes_of(d, torch.float16), q.view(torch.uint8)], dim=-1)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Pack 8 six-bit scales and 8 six-bit mins into the 12 bytes Q4_K/Q5_K use."""
    return torch.cat([(sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
                      (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
                      (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], dim=-1).to(torch.uint8)


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool = False):
    """llama.cpp's ``make_qkx2_quants`` on each row of ``x`` (weights ``w``): the codes (0..nmax),
    the scale and the (negated) minimum that fit the row best in weighted squared error (absolute
    error where ``mad``), searched over ``nstep`` + 1 candidate scales around min/max rounding."""
    def loss(diff):
        return diff.abs() if mad else diff * diff

    # C's running minimum keeps the first of equal values (the sign of a zero reaches Q4_1's bytes).
    lo = _at(x, x.argmin(dim=-1))
    lo = torch.where(lo > 0, 0.0, lo)
    hi = x.amax(dim=-1)
    flat = hi == lo
    hi = torch.where(flat, lo + 1.0, hi)  # flat rows end as zeros; this only keeps their arithmetic finite
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    iscale = _div(float(nmax), hi - lo)
    scale = _div(1.0, iscale)
    codes = torch.clamp(torch.round(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = _seq_sum(w * loss(scale[:, None] * codes + lo[:, None] - x))
    for step in range(nstep + 1):
        # llama.cpp measures the span from the best minimum so far.
        iscale = _div(float(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)), hi - lo)
        aux = torch.clamp(torch.round(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        wl = w * aux
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * aux), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        this_scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, det, ok, 0.0)
        this_min = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, det, ok, 0.0)
        positive = this_min > 0
        this_min = torch.where(positive, 0.0, this_min)
        this_scale = torch.where(positive, _safe_div(sum_xl, sum_l2, sum_l2 != 0, sum_xl), this_scale)
        error = _seq_sum(w * loss(this_scale[:, None] * aux + this_min[:, None] - x))
        better = ok & (error < best)
        codes = torch.where(better[:, None], aux, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    codes = torch.where(flat[:, None], 0.0, codes)
    scale = torch.where(flat, 0.0, scale)
    return codes, scale, -lo


def _scale_codes(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | float, lo: int, hi: int,
                 codes: torch.Tensor) -> torch.Tensor:
    """Each element's code from its sub-block's final (rounded) scale; sub-blocks whose scale rounds
    to zero keep the search's codes."""
    live = step != 0
    q = torch.round(_div(x + offset, torch.where(live, step, 1.0)[..., None]))
    return torch.where(live[..., None], torch.clamp(q, lo, hi), codes)


def _byte(v: torch.Tensor) -> torch.Tensor:
    """An integer-valued float kept in a C uint8 (a negative value wraps), as a float again."""
    return (v.to(torch.int64) & 0xFF).float()


def _refine(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor, active: torch.Tensor, lo: int | None, hi: int,
            store: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The refinement llama.cpp's ``make_q3_quants`` (``lo`` set) and ``make_qp_quants`` (``lo``
    None: codes only capped above, kept as bytes by ``store``) share: each element's code in turn
    moved to the one best fitting the others' scale while that lowers the weighted error, up to five
    passes, the rows of ``active`` only. Returns the codes and their sums Σwxl and Σwl²."""
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * levels), _seq_sum(w * levels * levels)
    levels = store(levels) if store else levels.clone()
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(x.shape[-1]):
            li = levels[:, i]
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            # make_qp_quants also needs the others' Σwl² positive before trying.
            fits = active & (slx > 0) & (sl2 > 0 if lo is None else True)
            new = torch.clamp(torch.round(_div(x[:, i] * sl2, torch.where(fits, slx, 1.0))), lo, hi)
            slx = slx + wx[:, i] * new
            sl2 = sl2 + w[:, i] * new * new
            take = fits & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = torch.where(take, store(new) if store else new, li)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
            changed |= take
        active = active & changed
        if not bool(active.any()):
            break
    return levels, sumlx, suml2


def _qp(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qp_quants`` on each row of non-negative ``x`` (weights ``w``): the scale and
    the codes (0..nmax, integers) that fit the row best in weighted squared error, from the best of
    nine scales near max / nmax, then each code revisited in turn, up to five passes, while a change
    lowers the error."""
    peak = x.amax(dim=-1)
    zero = peak < GROUP_MAX_EPS
    peak = torch.where(zero, 1.0, peak)

    def error(scale, levels):
        diff = x - scale[:, None] * levels
        return _seq_sum(w * diff * diff)

    iscale = _div(float(nmax), peak)
    best = error(_div(1.0, iscale), _byte(torch.round(iscale[:, None] * x)))  # uncapped, as C keeps it
    for step in (*range(-4, 0), *range(1, 5)):
        cand = _div(float(F32(0.1) * F32(step) + F32(nmax)), peak)
        err = error(_div(1.0, cand), torch.clamp(torch.round(cand[:, None] * x), max=nmax))
        better = err < best
        best, iscale = torch.where(better, err, best), torch.where(better, cand, iscale)
    levels = torch.clamp(torch.round(iscale[:, None] * x), max=nmax)
    levels, sumlx, suml2 = _refine(x, w, levels, ~zero, None, nmax, _byte)
    scale = _safe_div(sumlx, suml2, suml2 > 0, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, levels).to(torch.int64)


def _affine_k(x: torch.Tensor, levels: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared part of Q4_K and Q5_K: 8 sub-blocks of 32 with a 6-bit scale and min each under two
    f16 super-scales, as llama.cpp's reference finds them (``w`` None) or its ``_impl`` with search
    weights ``w``; returns the blocks' 16-byte heads and the codes."""
    sub = x.reshape(-1, 32)
    if w is not None:
        w = w.reshape(-1, 32)
        codes, scales, mins = _qkx2(sub, w, levels, -0.9, 0.05, 36)
        sw = _seq_sum(w).reshape(-1, 8)
        d, sc = _qp(scales.reshape(-1, 8), sw, 63)
        dmin, mn = _qp(mins.reshape(-1, 8), sw, 63)
        # Q5_K caps the codes at 63 again; _qp never exceeds it.
        return _k_blocks(x, levels, codes, sc, mn, d.to(torch.float16), dmin.to(torch.float16))
    # Weights of the search: the sub-block's RMS plus each value's magnitude.
    av = _sqrt(_div(_seq_sum(sub * sub), 32.0))
    rmin, nstep = (-1.0, 20) if levels == 15 else (-0.5, 15)
    codes, scales, mins = _qkx2(sub, av[:, None] + sub.abs(), levels, rmin, 0.1, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale, max_min = _running_max(scales), _running_max(mins)
    inv_scale = _safe_div(torch.full_like(max_scale, 63.0), max_scale, max_scale > 0, 0.0)
    inv_min = _safe_div(torch.full_like(max_min, 63.0), max_min, max_min > 0, 0.0)
    # Rounded to an int, kept as a byte (a negative scale wraps, as in C), then capped at 63.
    sc = torch.clamp(torch.round(inv_scale[:, None] * scales).to(torch.int64) & 0xFF, max=63)
    mn = torch.clamp(torch.round(inv_min[:, None] * mins).to(torch.int64) & 0xFF, max=63)
    d = _div(max_scale, 63.0).to(torch.float16)
    dmin = _div(max_min, 63.0).to(torch.float16)
    return _k_blocks(x, levels, codes, sc, mn, d, dmin)


def _k_blocks(x: torch.Tensor, levels: int, codes: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor,
              d: torch.Tensor, dmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K heads and codes from the search's codes, the 6-bit scales and mins and the f16
    super-scales: each code recomputed from its sub-block's rounded scale and min."""
    step = d.float()[:, None] * sc.float()
    offset = (dmin.float()[:, None] * mn.float())[..., None]
    codes = _scale_codes(x.reshape(-1, 8, 32), step, offset, 0, levels, codes.reshape(-1, 8, 32))
    head = torch.cat([_bytes_of(d, torch.float16), _bytes_of(dmin, torch.float16), _pack_k_scales(sc, mn)], dim=-1)
    return head, codes.to(torch.int64)


def _nibble_pack(q: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) codes -> (n, 128) bytes: sub-block 2c in the low nibbles of chunk c, 2c+1 in the high."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128).to(torch.uint8)


def _pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """256 two-bit codes per block as 64 bytes: byte l of each half of 128 holds elements l, l+32,
    l+64 and l+96 of that half, lowest bits first."""
    c = codes.reshape(-1, 2, 4, 32).to(torch.int64)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64).to(torch.uint8)


def q2_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's ``quantize_row_q2_K_ref`` (``quantize_row_q2_K_impl`` with search weights ``w``):
    16 sub-blocks of 16, 4-bit scale and min each."""
    x = x.reshape(-1, QK_K)
    sub = x.reshape(-1, 16)
    if w is not None:
        w = w.reshape(-1, 16)
        codes, scales, mins = _qkx2(sub, w, 3, -0.9, 0.05, 36)
        sw = _seq_sum(w).reshape(-1, 16)
        dm, ls = _qp(scales.reshape(-1, 16), sw, 15)
        mm, lm = _qp(mins.reshape(-1, 16), sw, 15)
        byte = (ls | (lm << 4)) & 0xFF
        return _q2_k_blocks(x, codes, byte, dm.to(torch.float16), mm.to(torch.float16))
    codes, scales, mins = _qkx2(sub, sub.abs(), 3, -0.5, 0.1, 15, mad=True)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale, max_min = _running_max(scales), _running_max(mins)
    live_s, live_m = max_scale > 0, max_min > 0
    # Rounded to an int and stored into a byte as C does (no clamp: a negative value wraps).
    sc = torch.where(live_s[:, None], torch.round(_safe_div(torch.full_like(max_scale, 15.0), max_scale, live_s,
                                                             1.0)[:, None] * scales), 0.0)
    mn = torch.where(live_m[:, None], torch.round(_safe_div(torch.full_like(max_min, 15.0), max_min, live_m,
                                                             1.0)[:, None] * mins), 0.0)
    byte = (sc.to(torch.int64) & 0xFF) | ((mn.to(torch.int64) << 4) & 0xFF)
    d = torch.where(live_s, _div(max_scale, 15.0), 0.0).to(torch.float16)
    dmin = torch.where(live_m, _div(max_min, 15.0), 0.0).to(torch.float16)
    return _q2_k_blocks(x, codes, byte, d, dmin)


def _q2_k_blocks(x: torch.Tensor, codes: torch.Tensor, byte: torch.Tensor, d: torch.Tensor,
                 dmin: torch.Tensor) -> torch.Tensor:
    """Q2_K's bytes from the search's codes, the scale/min bytes and the two f16 super-scales: each
    code recomputed from its sub-block's rounded scale and min."""
    step = d.float()[:, None] * (byte & 0xF).float()
    offset = (dmin.float()[:, None] * (byte >> 4).float())[..., None]
    codes = _scale_codes(x.reshape(-1, 16, 16), step, offset, 0, 3, codes.reshape(-1, 16, 16))
    return torch.cat([byte.to(torch.uint8), _pack_2bit(codes), _bytes_of(d, torch.float16),
                      _bytes_of(dmin, torch.float16)], dim=-1)


def _q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_q3_quants`` (with its refinement) on each row of ``x``: codes in
    0..2*nmax-1 and the signed scale; each element's code is revisited in turn, up to five passes,
    while a change lowers the weighted error."""
    peak = _peak(x)
    zero = peak.abs() < GROUP_MAX_EPS
    iscale = _div(float(-nmax), torch.where(zero, 1.0, peak))
    levels = torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)
    levels, sumlx, suml2 = _refine(x, x * x, levels, ~zero, -nmax, nmax - 1)
    scale = _safe_div(sumlx, suml2, suml2 > 0, 0.0)
    codes = torch.where(zero[:, None], 0.0, levels + float(nmax))
    return codes, torch.where(zero, 0.0, scale)


def _sub_blocks_of_16(x: torch.Tensor, search, nmax: int):
    """Blocks of 256 searched as 16 sub-blocks of 16 (``search``: _q3 or _qx): the blocks, the codes
    (n, 16, 16), the scales (n, 16) and each block's first scale of the largest magnitude."""
    x = x.reshape(-1, QK_K)
    codes, scales = search(x.reshape(-1, 16), nmax)
    scales = scales.reshape(-1, 16)
    return x, codes.reshape(-1, 16, 16), scales, _peak(scales)


def q3_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's ``quantize_row_q3_K_ref`` (``quantize_row_q3_K_impl`` with search weights ``w``):
    16 sub-blocks of 16, 6-bit signed scales under one f16."""
    if w is not None:
        w = w.reshape(-1, 16)
        x, codes, scales, _ = _sub_blocks_of_16(x, functools.partial(_qx, w=w), 4)
        # The scales are searched like values, weighted by their sub-blocks' total weight.
        sc, d = _qx(scales, 32, _seq_sum(w).reshape(-1, 16))
        return _q3_k_blocks(x, codes, sc.to(torch.int64), d.to(torch.float16))
    x, codes, scales, peak = _sub_blocks_of_16(x, _q3, 4)
    live_block = peak != 0
    iscale = _div(-32.0, torch.where(live_block, peak, 1.0))
    # Rounded to an int, kept as an int8 (wrapping, as C's cast does), clamped to -32..31, then +32.
    sc = torch.round(iscale[:, None] * scales).to(torch.int64)
    sc = torch.clamp(((sc + 128) & 0xFF) - 128, -32, 31) + 32
    d = torch.where(live_block, _div(1.0, iscale), 0.0).to(torch.float16)
    # A block of zeros stores zero scale bytes (its d is 0, so its codes stay the search's).
    return _q3_k_blocks(x, codes, torch.where(live_block[:, None], sc, 0), d)


def _q3_k_blocks(x: torch.Tensor, codes: torch.Tensor, sc: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q3_K's bytes from the search's codes (0..7), the scales (0..63, 32 meaning zero) and the f16
    super-scale: each code recomputed from its sub-block's rounded scale."""
    # Low nibbles of scales j and j + 8 in byte j; the top two bits of scale 4k + m in byte 8 + m.
    low = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    top = _bits((sc >> 4).reshape(-1, 4, 4), 1, width=2)
    packed = torch.cat([low, top], dim=-1).to(torch.uint8)
    step = d.float()[:, None] * (sc - 32).float()
    codes = _scale_codes(x.reshape(-1, 16, 16), step, 0.0, -4, 3, codes - 4.0) + 4.0
    codes = codes.to(torch.int64).reshape(-1, QK_K)
    high = codes > 3  # element j's third bit: bit j // 32 of mask byte j % 32
    hmask = _bits(high.reshape(-1, 8, 32), 1).to(torch.uint8)
    return torch.cat([hmask, _pack_2bit(torch.where(high, codes - 4, codes)), packed, _bytes_of(d, torch.float16)],
                     dim=-1)


def q4_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    head, q = _affine_k(x, 15, w)
    return torch.cat([head, _nibble_pack(q)], dim=-1)


def q5_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    head, q = _affine_k(x, 31, w)
    qh = _bits((q >> 4) & 1, 1).to(torch.uint8)  # (n, 32): bit j of qh byte i is sub-block j
    return torch.cat([head, qh, _nibble_pack(q)], dim=-1)


def _qx(x: torch.Tensor, nmax: int, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qx_quants`` on each row of ``x`` (weights ``w``, default x²): codes in
    0..2*nmax-1 and the signed scale, searched over 18 scales around the one fitting the row's
    largest magnitude."""
    peak = _peak(x)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, 1.0, peak)
    w = x * x if w is None else w

    def fit(iscale):
        levels = torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)
        return levels, _seq_sum(w * x * levels), _seq_sum(w * levels * levels)

    levels, sumlx, suml2 = fit(_div(float(-nmax), peak))
    scale = _safe_div(sumlx, suml2, suml2 != 0, 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        cand, lx, l2 = fit(_div(-float(F32(nmax) + F32(0.1) * F32(step)), peak))
        better = (l2 > 0) & (lx * lx > best * l2)
        levels = torch.where(better[:, None], cand, levels)
        scale = torch.where(better, _safe_div(lx, l2, l2 > 0, 0.0), scale)
        best = torch.where(better, scale * lx, best)
    codes = torch.where(zero[:, None], 0.0, levels + float(nmax))
    return codes, torch.where(zero, 0.0, scale)


def q6_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's ``quantize_row_q6_K_ref`` (``quantize_row_q6_K_impl`` with search weights ``w``):
    16 sub-blocks of 16, 8-bit signed scales under one f16."""
    search = _qx if w is None else functools.partial(_qx, w=w.reshape(-1, 16))
    x, codes, scales, peak = _sub_blocks_of_16(x, search, 32)
    empty = peak.abs() < GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(empty, 1.0, peak))
    d = torch.where(empty, 0.0, _div(1.0, iscale)).to(torch.float16)
    sc = torch.where(empty[:, None], 0.0, torch.clamp(torch.round(iscale[:, None] * scales), max=127)).to(torch.int8)
    step = d.float()[:, None] * sc.float()
    q = _scale_codes(x.reshape(-1, 16, 16), step, 0.0, -32, 31, codes - 32.0) + 32.0
    q = torch.where(empty[:, None, None], 0.0, q).to(torch.int64).reshape(-1, 2, 128)  # two halves of 128
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    qh = torch.where(empty[:, None, None], 0, qh)
    return torch.cat([ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8), sc.view(torch.uint8),
                      _bytes_of(d, torch.float16)], dim=-1)


# How many candidate scales either side of the first the IQ4 search tries (ggml_quantize_chunk's 7).
IQ4_TRIES = 7


def _iq4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=device)


def _iq4_index(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``best_index_int8``: the nearest code value's index (a tie to the upper one)."""
    upper = torch.clamp(torch.searchsorted(table, v.contiguous(), right=True), 1, 15)
    nearer_lower = (v - table[upper - 1]) < (table[upper] - v)
    inside = torch.where(nearer_lower, upper - 1, upper)
    return torch.where(v <= table[0], 0, torch.where(v >= table[15], 15, inside))


def _iq4_scales(x: torch.Tensor, table: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The scale of each row of 32 that llama.cpp's ``quantize_row_iq4_nl_impl`` searches for (weights
    ``w``, default x²; 0 for an all-zero row)."""
    peak = _peak(x)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, 1.0, peak)
    w = x * x if w is None else w.reshape(-1, 32)

    def fit(inverse):
        q = table[_iq4_index(inverse[:, None] * x, table)]
        wq = w * q
        return _seq_sum(wq * x), _seq_sum(wq * q)

    sumqx, sumq2 = fit(_div(1.0, _div(-peak, float(IQ4_VALUES[0]))))
    d = _safe_div(sumqx, sumq2, sumq2 > 0, 0.0)
    best = d * sumqx
    for step in range(-IQ4_TRIES, IQ4_TRIES + 1):
        sumqx, sumq2 = fit(_div(float(step + IQ4_VALUES[0]), peak))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, _safe_div(sumqx, sumq2, better, 0.0), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, 0.0, d)


def _iq4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes of 32-element runs as 16 bytes each: element j low nibble, j + 16 high."""
    c = codes.reshape(-1, 2, 16)
    return (c[:, 0] | (c[:, 1] << 4)).reshape(len(codes), -1).to(torch.uint8)


def iq4_nl(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's ``quantize_iq4_nl`` (search weights ``w``: with an importance matrix): one f16
    scale per 32."""
    table = _iq4_table(x.device)
    x = x.reshape(-1, 32)
    d = _iq4_scales(x, table, w)
    codes = _iq4_index(_recip(d)[:, None] * x, table)
    return torch.cat([_bytes_of(d, torch.float16), _iq4_pack(codes)], dim=-1)


def iq4_xs(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's ``quantize_iq4_xs`` (search weights ``w``: with an importance matrix): 6-bit
    scales of 32 under one f16."""
    table = _iq4_table(x.device)
    x = x.reshape(-1, QK_K)
    scales = _iq4_scales(x.reshape(-1, 32), table, w).reshape(-1, 8)
    peak = _peak(scales)
    peak = torch.where(peak == 0, 0.0, peak)  # the running maximum starts from +0.0
    d = _div(-peak, 32.0)
    levels = torch.clamp(torch.round(_recip(d)[:, None] * scales), -32, 31)
    step = d[:, None] * levels  # from the unrounded d, as llama.cpp does
    codes = _iq4_index(_recip(step)[..., None] * x.reshape(-1, 8, 32), table).reshape(-1, 32)
    ls = (levels + 32).to(torch.int64)
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    scales_h = _bits(ls >> 4, -1, width=2)
    return torch.cat([_bytes_of(d, torch.float16), _bytes_of(scales_h, torch.int16), scales_l,
                      _iq4_pack(codes).reshape(len(x), -1)], dim=-1)

