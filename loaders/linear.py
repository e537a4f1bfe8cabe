"""A linear layer whose weight is GGUF block bytes: dequantize then matmul, or on CUDA, for a few rows
of input and a large weight, the fused kernel of ``triton_matmul``. (Weights the fp8 mode
requantized run fp8 matmuls, see ``fp8``.)"""

from __future__ import annotations

import logging
import os

import torch
from gguf import GGMLQuantizationType

from .fp8 import FP8_ROWS, fp8_linear, operands
from .tensor import cuda_kernels, dequantize_bytes

log = logging.getLogger(__name__)

# Where the fused kernel beats dequant + cuBLAS (bench/fused_matmul.py on an H100, every type): up to
# 16 rows on weights of 32M elements and more (a Qwen2.5-VL MLP 1.4-1.5x, Qwen-Image's modulation
# 1.3x; on an H200 the same picks ran 0.92-1.55x, IQ4_NL aside); on smaller weights the dequant is
# too short to matter and with more rows the tensor cores of cuBLAS win. The rule depends only on
# shapes and types, so it is the same in eager and compiled runs.
FUSED_MAX_ROWS = 16
FUSED_MIN_ELEMENTS = 32 << 20
# Types whose dequant + cuBLAS beats their fused kernel on those shapes too: IQ4_NL's dequant kernel
# reads 2-byte words at 95% of the copy bandwidth, and its fused kernel ran 0.88-0.96x of it on every
# shape the rule picks (H200, 2026-12-01; before that dequant kernel, 0.91-1.15x).
DEQUANT_ONLY = frozenset({GGMLQuantizationType.IQ4_NL})
# "auto" (the rule above), "on" (fused wherever the kernel applies: for benchmarks) or "off".
FUSED_CHOICES = ("auto", "on", "off")


def fused_choice(value: str) -> str:
    """The QWEN_GGUF_FUSED setting ``value``, or "auto" (with a warning saying so) for anything else."""
    if value in FUSED_CHOICES:
        return value
    log.warning("QWEN_GGUF_FUSED=%r is not one of %s: using auto", value, ", ".join(FUSED_CHOICES))
    return "auto"


FUSED = fused_choice(os.environ.get("QWEN_GGUF_FUSED", "auto"))
# Rows beyond which even "on" does not use the fused kernel (dequant + cuBLAS wins long before).
FORCED_MAX_ROWS = 512


def uses_fused(rows: int, shape, qtype: GGMLQuantizationType, dtype: torch.dtype) -> bool:
    """Whether a CUDA layer of ``qtype`` (a type with a Triton kernel) takes the fused kernel for
    ``rows`` rows of input on a weight of ``shape``."""
    # Runs for every layer on every forward: the shape tests that rule out most calls come first.
    if FUSED == "on":
        if not 0 < rows <= FORCED_MAX_ROWS:
            return False
    elif (FUSED == "off" or not 0 < rows <= FUSED_MAX_ROWS or shape[0] * shape[1] < FUSED_MIN_ELEMENTS
          or qtype in DEQUANT_ONLY):
        return False
    return dtype in (torch.bfloat16, torch.float16)


def quantized_linear(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLQuantizationType, shape,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, W, bias)`` with W the contiguous block bytes ``raw`` of logical ``shape``
    (out_features, in_features), everything on one device; the result in ``x``'s dtype."""
    if qtype is FP8_ROWS:
        return fp8_linear(x, operands(raw, shape), bias)
    if raw.is_cuda:
        kernels = cuda_kernels()
        if kernels is not None and qtype in kernels.KERNEL_TYPES:
            if uses_fused(x.numel() // shape[-1], shape, qtype, x.dtype):
                from .triton_matmul import fused_linear
                return fused_linear(x, raw, qtype, shape, bias)
            return torch.nn.functional.linear(x, kernels.dequantize_cuda(raw, qtype, shape, x.dtype), bias)
    return torch.nn.functional.linear(x, dequantize_bytes(raw, qtype, shape, x.dtype), bias)
