"""Quantized GGUF weights as torch tensors that stay quantized wherever they are moved.

A ``GGMLTensor`` is the raw block bytes (uint8, one row of blocks per weight row) plus the quant
type and the logical torch shape. Being real uint8 storage, it moves between devices with its bytes
and reports its true size to anything that counts ``numel() * element_size()`` (ComfyUI's memory
accounting does). Anything that asks it for a float dtype gets the dequantized weight, so generic
code that calls ``.to(torch.float32)`` on a weight receives values, never reinterpreted bytes.
"""

from __future__ import annotations

import functools
import os

import torch
from gguf import GGMLQuantizationType

from .fp8 import FP8_ROWS, dequantize_rows
from .quants import DEQUANTIZERS

_CONVERSIONS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.half,
                torch.Tensor.bfloat16, torch.Tensor.double}
_NAMED_DTYPE = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
                torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}


class GGMLTensor(torch.Tensor):
    qtype: GGMLQuantizationType
    qshape: torch.Size

    @staticmethod
    def __new__(cls, raw: torch.Tensor, qtype: GGMLQuantizationType, shape, stored_shape=None) -> "GGMLTensor":
        """``shape`` is the weight's logical shape; ``stored_shape`` the one its blocks are laid out in
        when the file reshaped it (ComfyUI-GGUF's converter does, recording the original)."""
        qcls = DEQUANTIZERS[qtype]
        stored = tuple(stored_shape or shape)
        rows = 1
        for dim in stored[:-1]:
            rows *= dim
        raw = raw.reshape(rows, stored[-1] // qcls.block_size * qcls.type_size)
        t = torch.Tensor._make_subclass(cls, raw, False)
        t.qtype, t.qshape = qtype, torch.Size(shape)
        return t

    def __repr__(self) -> str:
        return f"GGMLTensor({self.qtype.name}, shape={list(self.qshape)}, device={self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], GGMLTensor) else None
        if src is not None and func in _CONVERSIONS:
            device, dtype = _conversion_target(func, args[1:], kwargs)
            if dtype is not None and dtype.is_floating_point:
                moved = src if device is None else src.to(device, non_blocking=kwargs.get("non_blocking", False))
                return dequantize(moved, dtype)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        # Results that are still this tensor's bytes (moves, copies, detach, .data) keep their meaning.
        if (src is not None and type(out) is torch.Tensor and out.dtype == torch.uint8
                and out.shape == torch.Tensor.size(src)):
            return wrap(out, src.qtype, src.qshape)
        return out


def wrap(raw: torch.Tensor, qtype, shape) -> GGMLTensor:
    """``raw``, already laid out as ``qtype`` stores it (or FP8 rows), as a quantized tensor."""
    t = torch.Tensor._make_subclass(GGMLTensor, raw, False)
    t.qtype, t.qshape = qtype, torch.Size(shape)
    return t


def _conversion_target(func, args, kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    if func in _NAMED_DTYPE:
        return None, _NAMED_DTYPE[func]
    if func is torch.Tensor.type:
        dtype = args[0] if args else kwargs.get("dtype")
        return None, dtype if isinstance(dtype, torch.dtype) else None
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype


@functools.lru_cache(maxsize=1)
def cuda_kernels():
    """The Triton kernels, where Triton can run (CUDA); None elsewhere or when switched off."""
    if os.environ.get("QWEN_GGUF_TORCH_DEQUANT") == "1" or not torch.cuda.is_available():
        return None
    try:
        from . import triton_dequant
    except ImportError:
        return None
    return triton_dequant


def dequantize(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a ``dtype`` tensor of its logical shape, computed on the tensor's device."""
    if not isinstance(t, GGMLTensor):
        return t.to(dtype)
    with torch._C.DisableTorchFunctionSubclass():
        return dequantize_bytes(t, t.qtype, t.qshape, dtype)


def dequantize_bytes(raw: torch.Tensor, qtype: GGMLQuantizationType, shape, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize plain uint8 block bytes (one Triton kernel on CUDA, the torch dequantizers elsewhere;
    both give the same bits). The per-layer path calls this directly, without a tensor subclass."""
    if qtype is FP8_ROWS:
        return dequantize_rows(raw, shape, dtype)
    if raw.numel() == 0:  # a zero-element tensor (valid GGUF): no blocks to reshape into
        return torch.empty(shape, dtype=dtype, device=raw.device)
    if raw.is_cuda:
        kernels = cuda_kernels()
        if kernels is not None and qtype in kernels.KERNEL_TYPES:
            return kernels.dequantize_cuda(raw.contiguous(), qtype, shape, dtype)
    qcls = DEQUANTIZERS[qtype]
    return qcls.dequantize_blocks(raw.reshape(-1, qcls.type_size)).reshape(shape).to(dtype)


def logical_shape(t: torch.Tensor) -> torch.Size:
    return t.qshape if isinstance(t, GGMLTensor) else t.shape


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack weights along their first axis (fusing q, k, v), keeping them quantized where they share a type."""
    if all(isinstance(p, GGMLTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        with torch._C.DisableTorchFunctionSubclass():
            raw = torch.cat(parts, dim=0)
        shape = (sum(p.qshape[0] for p in parts), *parts[0].qshape[1:])
        return GGMLTensor(raw, parts[0].qtype, shape)
    if any(isinstance(p, GGMLTensor) for p in parts):
        return torch.cat([dequantize(p, torch.bfloat16) for p in parts], dim=0)
    return torch.cat(parts, dim=0)
