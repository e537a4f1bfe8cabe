"""FP8 rows: a weight requantized to float8 e4m3 with one fp32 scale per output row, run with fp8
matmuls on GPUs that have fp8 tensor cores (compute capability 8.9 and up).

The bytes of an ``[out, in]`` weight are the fp8 values row after row, then the ``out`` scales,
in one flat uint8 tensor. Being bytes like a GGUF weight, it travels through ComfyUI's loaders,
offload and dynamic VRAM paging exactly as the GGUF blocks do, scales included, and the fp8 part
is a contiguous ``[out, in]`` matrix that ``torch._scaled_mm`` takes as it is. Activations are
quantized per row (per token) at run time, so one outlier token does not flatten the others.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from ..compat import triton_kernels
from .formats import Format

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# Fast accumulation (partial sums kept in the tensor cores' reduced precision) makes Hopper's fp8
# matmuls 15-20% quicker on Qwen-Image's 3072-wide inputs for about 10% more matmul error; on the
# MLP's 12288-wide input it gains 8-11% for 75% more error, and using it there doubled the final
# latent's error after a few steps (bench/fp8_matmul.py, bench/qwen_step.py). So only inputs up to
# this wide take it.
FAST_ACCUM_MAX_IN = 4096
# The smallest row maximum a scale is computed from, so an all-zero row gets a finite scale (and stays zero).
MIN_AMAX = 1e-12
# Elements of a weight dequantized at once to find its rows' scales (``row_scales``): 64 MB of fp32.
SCALE_CHUNK = 1 << 24


def can_hold(shape) -> bool:
    """fp8 matmuls need both matrix sizes to be multiples of 16."""
    return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0


def _scales(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp(min=MIN_AMAX) / FP8_MAX


def quantize_rows(w: torch.Tensor) -> torch.Tensor:
    """The FP8-rows bytes of the float weight ``w`` ([out, in]), computed on ``w``'s device."""
    w = w.float()
    scale = _scales(w.abs().amax(dim=1))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch.cat([q.view(torch.uint8).reshape(-1), scale.view(torch.uint8)])


def row_scales(raw: torch.Tensor, shape, dequantize: Callable[[torch.Tensor, torch.Size], torch.Tensor],
               chunk: int = SCALE_CHUNK) -> torch.Tensor:
    """``quantize_rows``' scales of the ``[out, in]`` weight held as the contiguous bytes ``raw`` of its
    rows (whole quant blocks each), ``dequantize(bytes, shape)`` giving rows in float32: a few rows at
    a time (16 or more, so each slice keeps the bytes' alignment), never the whole weight in fp32,
    which would leave torch's cache holding blocks of 4 bytes per element of the largest layer."""
    n, k = shape
    rows = raw.reshape(n, -1)
    step = max(16, chunk // k // 16 * 16)
    return _scales(torch.cat([dequantize(rows[i:i + step], torch.Size((min(step, n - i), k))).abs().amax(dim=1)
                              for i in range(0, n, step)]))


def split(raw: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 ``[out, in]`` matrix and the ``out`` fp32 scales held in ``raw``."""
    n, k = shape
    raw = raw.reshape(-1)
    return raw[:n * k].view(FP8).view(n, k), raw[n * k:].view(torch.float32)


@functools.lru_cache(maxsize=None)
def fast_path(device: torch.device) -> str | None:
    """How this device runs fp8 matmuls: "rowwise" (scales per token and per channel inside the
    matmul, Hopper and later), "tensorwise" (per-tensor activation scale, channel scales applied
    to the output: Ada), or None (no fp8 tensor cores, or no Triton: dequantize instead)."""
    if device.type != "cuda" or not triton_kernels() or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    return "rowwise" if torch.cuda.get_device_capability(device) >= (9, 0) else "tensorwise"


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    """The unit scale of the weights' side of a tensor-wise fp8 matmul (made once, not per layer)."""
    return torch.ones((), device=device, dtype=torch.float32)


class FP8Weight(NamedTuple):
    """FP8-rows bytes as the fp8 matmul takes them (views, no copies): the values transposed
    (``[in, out]``, column-major), the scales as one row (``[1, out]``), the logical shape, and how the
    weight's device runs fp8 matmuls (``fast_path``)."""
    values_t: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    path: str | None


def operands(raw: torch.Tensor, shape) -> FP8Weight:
    """The FP8Weight viewing the contiguous FP8-rows bytes ``raw`` of logical ``shape`` (out, in)."""
    # Per layer per step where the bytes are not kept resident: few tensor calls, each a view of the
    # bytes. (Only tensor ops: reading the storage offset on the host would break a compiled graph.)
    n, k = shape
    values_t = raw.as_strided((k, n), (1, k)).view(FP8)
    scales = raw.reshape(-1)[n * k:].view(torch.float32).view(1, n)
    return FP8Weight(values_t, scales, (n, k), fast_path(raw.device))


def dequantize_weight(w: FP8Weight, dtype: torch.dtype) -> torch.Tensor:
    return (w.values_t.t().float() * w.scales.t()).to(dtype)


@functools.cache
def _activation_quantizer():
    # Imported at the first fp8 matmul: the kernels need Triton, which a CPU install may lack.
    from .kernels.fp8_act import quantize_activations
    return quantize_activations


def quantize_input(x: torch.Tensor, w: FP8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` quantized for an fp8 matmul with ``w``: fp8 rows and their scales (see kernels.fp8_act)."""
    return _activation_quantizer()(x.reshape(-1, w.shape[1]), per_row=w.path == "rowwise")


class SharedInput:
    """One activation quantization for a group of layers that read the same input one after another
    (an attention's q, k and v projections): a member given the very tensor object the one before it
    quantized takes that quantization. The group's last member lets go of it whichever way it runs
    (an fp8 matmul, or a LoRA-patched or fp32 path: see release), so nothing is held past the group
    even where some members never quantize. (Inference tensors carry no version counter, so this is
    for groups whose model code changes nothing in between.)"""

    def __init__(self):
        self.source = self.quantized = None

    def quantize(self, x: torch.Tensor, w: FP8Weight, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        quantized = self.quantized if x is self.source else quantize_input(x, w)
        if last:
            self.release()
        else:
            self.source, self.quantized = x, quantized
        return quantized

    def release(self) -> None:
        self.source = self.quantized = None


def fp8_linear(x: torch.Tensor, w: FP8Weight, bias: torch.Tensor | None = None,
               shared: SharedInput | None = None, last: bool = True) -> torch.Tensor:
    """``linear(x, W, bias)`` for W held as FP8 rows. A bf16 ``x`` on an fp8-capable GPU takes an fp8
    matmul (its quantization shared with the layers of ``shared``, of which this is the ``last``
    or not); anything else (fp32 as the NaN guard's recomputation asks, a CPU) gets the dequantized
    weight."""
    if w.path is None or x.dtype != torch.bfloat16:
        if shared is not None and last:
            shared.release()
        return torch.nn.functional.linear(x, dequantize_weight(w, x.dtype), bias)
    xq, x_scale = shared.quantize(x, w, last) if shared is not None else quantize_input(x, w)
    n, k = w.shape
    fast = k <= FAST_ACCUM_MAX_IN
    if w.path == "rowwise":
        out = torch._scaled_mm(xq, w.values_t, scale_a=x_scale, scale_b=w.scales, bias=bias,
                               out_dtype=torch.bfloat16, use_fast_accum=fast)
    else:
        out = torch._scaled_mm(xq, w.values_t, scale_a=x_scale, scale_b=_one(x.device), out_dtype=torch.bfloat16,
                               use_fast_accum=fast)
        out = out * w.scales.to(torch.bfloat16)
        if bias is not None:
            out = out + bias
    return out.view(*x.shape[:-1], n)


class FP8Rows(Format):
    """FP8 rows as a format (not a GGML type, so not in ``formats.FORMATS``): the fp8 mode's."""
    name = "FP8_E4M3_ROWS"

    @classmethod
    def dequantize(cls, raw, shape, dtype):
        return dequantize_weight(operands(raw.contiguous(), shape), dtype)

    @staticmethod
    def encode(w: torch.Tensor) -> torch.Tensor:
        return quantize_rows(w)
