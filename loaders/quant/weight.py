"""The quantized weight: torch tensors that stay quantized wherever they are moved.

A ``GGMLTensor`` is the raw bytes (uint8, one row of blocks per weight row) plus their format (a
registry entry: a GGML block type, or FP8 rows) and the logical torch shape. Being real uint8
storage, it moves between devices with its bytes and reports its true size to anything that counts ``numel() * element_size()`` (ComfyUI's memory
accounting does). Anything that asks it for a float dtype gets the dequantized weight, so generic
code that calls ``.to(torch.float32)`` on a weight receives values, never reinterpreted bytes.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ..compat import parse_to, triton_kernels
from .formats import FORMATS, Format

_CONVERSIONS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.half,
                torch.Tensor.bfloat16, torch.Tensor.double}
_NAMED_DTYPE = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
                torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}



def format_of(fmt: GGMLQuantizationType | type[Format]) -> type[Format]:
    """The registry entry of a GGML type (or the entry itself)."""
    return FORMATS[fmt] if isinstance(fmt, GGMLQuantizationType) else fmt


class GGMLTensor(torch.Tensor):
    fmt: type[Format]
    qshape: torch.Size

    @staticmethod
    def __new__(cls, raw: torch.Tensor, fmt: GGMLQuantizationType | type[Format], shape, stored_shape=None) -> "GGMLTensor":
        """GGML blocks ``raw`` of type ``fmt``; ``shape`` is the weight's logical shape, ``stored_shape``
        the one its blocks are laid out in when the file reshaped it (ComfyUI-GGUF's converter does,
        recording the original)."""
        fmt = format_of(fmt)
        stored = tuple(stored_shape or shape)
        rows = 1
        for dim in stored[:-1]:
            rows *= dim
        return wrap(raw.reshape(rows, stored[-1] // fmt.block_size * fmt.type_size), fmt, shape)

    def __repr__(self) -> str:
        return f"GGMLTensor({self.fmt.name}, shape={list(self.qshape)}, device={self.device})"

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
            return wrap(out, src.fmt, src.qshape)
        return out


def wrap(raw: torch.Tensor, fmt: GGMLQuantizationType | type[Format], shape) -> GGMLTensor:
    """``raw``, already laid out as ``fmt`` stores it, as a quantized tensor."""
    t = torch.Tensor._make_subclass(GGMLTensor, raw, False)
    t.fmt, t.qshape = format_of(fmt), torch.Size(shape)
    return t


def _conversion_target(func, args, kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    if func in _NAMED_DTYPE:
        return None, _NAMED_DTYPE[func]
    if func is torch.Tensor.type:
        dtype = args[0] if args else kwargs.get("dtype")
        return None, dtype if isinstance(dtype, torch.dtype) else None
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    device, dtype, _, _ = parse_to(*args, **kwargs)
    return device, dtype


def dequantize(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a ``dtype`` tensor of its logical shape, computed on the tensor's device."""
    if not isinstance(t, GGMLTensor):
        return t.to(dtype)
    with torch._C.DisableTorchFunctionSubclass():
        return dequantize_bytes(t, t.fmt, t.qshape, dtype)


def dequantize_bytes(raw: torch.Tensor, fmt: type[Format], shape, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize plain bytes of ``fmt`` once (loading, converting, checking): one Triton kernel on
    CUDA, the torch path elsewhere, the same bits. A layer binds a plan instead (``plan``)."""
    if raw.is_cuda and fmt.tile is not None and triton_kernels():
        from .kernels.dequant import dequantize_cuda
        return dequantize_cuda(raw, fmt, shape, dtype)
    return fmt.dequantize(raw, shape, dtype)


def logical_shape(t: torch.Tensor) -> torch.Size:
    return t.qshape if isinstance(t, GGMLTensor) else t.shape


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack weights along their first axis (fusing q, k, v), keeping them quantized where they share a type."""
    if all(isinstance(p, GGMLTensor) for p in parts) and len({p.fmt for p in parts}) == 1:
        with torch._C.DisableTorchFunctionSubclass():
            raw = torch.cat(parts, dim=0)
        shape = (sum(p.qshape[0] for p in parts), *parts[0].qshape[1:])
        return wrap(raw, parts[0].fmt, shape)
    if any(isinstance(p, GGMLTensor) for p in parts):
        return torch.cat([dequantize(p, torch.bfloat16) for p in parts], dim=0)
    return torch.cat(parts, dim=0)
