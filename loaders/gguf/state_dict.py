"""Turning an open GGUF file into a torch state dict without copying its bytes.

Float tensors become views of the map in their own dtype; the block types with a torch dequantizer
become ``GGMLTensor``s and stay quantized; any other type the ``gguf`` package can read is converted
once here, because dequantizing it per step on the CPU would stall every forward.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from gguf import quants

from .errors import GGUFError
from .reader import GGUFFile, TensorInfo, absurd
from ..quant.formats import FLOAT_TYPES, FORMATS
from ..quant.weight import GGMLTensor, dequantize, logical_shape

log = logging.getLogger(__name__)


ORIG_SHAPE_KEY = "comfy.gguf.orig_shape.{}"


def logical_shape_of(gguf: GGUFFile, info: TensorInfo) -> tuple[int, ...]:
    """The tensor's shape for the model: ComfyUI-GGUF's converter stores some tensors reshaped (more
    than 4 dimensions, or rows that do not fill a quant block) and records the original shape."""
    orig = gguf.get(ORIG_SHAPE_KEY.format(info.name))
    if orig is None:
        return info.shape
    values = list(orig) if isinstance(orig, (list, np.ndarray)) else None
    if not values or len(values) > 8 or any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer))
                                            or d < 0 for d in values):
        raise GGUFError(gguf.path, f"tensor {info.name!r}: its recorded original shape ({ORIG_SHAPE_KEY.format(info.name)}) "
                                   f"is not a list of up to 8 non-negative integers")
    shape = tuple(int(d) for d in values)
    if absurd(shape) or int(np.prod(shape, dtype=np.float64)) != info.n_elements:
        raise GGUFError(gguf.path, f"tensor {info.name!r}: its recorded original shape {list(shape)} does not hold "
                                   f"its {info.n_elements:,} elements")
    return shape


def tensor_from_file(gguf: GGUFFile, info: TensorInfo, convert_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    raw = gguf.raw(info.name)
    shape = logical_shape_of(gguf, info)
    if info.qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[info.qtype]).reshape(shape)
    if info.qtype in FORMATS:
        quantized = GGMLTensor(raw, info.qtype, shape, stored_shape=info.shape)
        # Only matrices (Linear and embedding weights) run quantized; a quantized vector, pad token or
        # convolution kernel is small and lands in a plain parameter: converted once here.
        return quantized if len(shape) == 2 and shape[0] > 1 else dequantize(quantized, convert_dtype)
    if info.n_elements == 0:  # a marker (Edit-2511's): no values to decode, whatever its type says
        return torch.empty(shape, dtype=convert_dtype)
    rows = info.n_elements // info.shape[-1]
    try:
        values = quants.dequantize(raw.numpy().reshape(rows, -1), info.qtype)
    except NotImplementedError:
        raise GGUFError(gguf.path, f"tensor {info.name!r}: quant type {info.qtype.name} is not supported "
                                   "(supported: F32, F16, BF16, Q4_0 to Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS, "
                                   "and the other types gguf-py can read)") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape).to(convert_dtype)


def load_state_dict(gguf: GGUFFile, rename: Callable[[str], str | None] = lambda n: n,
                    convert_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor under its renamed key (``rename`` returning None drops it)."""
    sd: dict[str, torch.Tensor] = {}
    converted: dict[str, int] = {}
    for info in gguf.tensors.values():
        key = rename(info.name)
        if key is None:
            continue
        sd[key] = tensor_from_file(gguf, info, convert_dtype)
        if info.qtype not in FLOAT_TYPES and info.qtype not in FORMATS and info.n_elements:
            converted[info.qtype.name] = converted.get(info.qtype.name, 0) + 1
    if converted:
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(converted.items()))
        log.warning("%s: %s tensors have no on-the-fly dequantizer; converted once to %s at load, "
                    "which costs more memory than keeping them quantized", gguf.path, kinds, convert_dtype)
    return sd


def type_counts(gguf: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in gguf.tensors.values():
        counts[info.qtype.name] = counts.get(info.qtype.name, 0) + 1
    return counts


def quant_summary(gguf: GGUFFile) -> str:
    """e.g. 'Q4_K x720, Q6_K x120, F32 x1093' for the log line a user reads after loading."""
    return ", ".join(f"{n} x{c}" for n, c in sorted(type_counts(gguf).items(), key=lambda kv: -kv[1]))


def _leading_ones_dropped(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def check_tensors(path: str, sd: dict, expected: dict[str, tuple[int, ...]], what: str,
                  unexpected_is_fault: bool = True) -> list[str]:
    """Before a model is built: one GGUFError listing every missing and mis-shaped tensor (and, where
    ``unexpected_is_fault``, every tensor the model has no place for). Returns the unexpected names.
    A float tensor stored without its leading dimensions of size 1 gets them back in ``sd``: ggml's
    own writer (stable-diffusion.cpp's files, llama-quantize's) keeps dimensions only up to the last
    one above 1, so a [1, 3840] pad token comes back as [3840]."""
    for k, shape in expected.items():
        t = sd.get(k)
        if (t is not None and not isinstance(t, GGMLTensor) and tuple(t.shape) != tuple(shape)
                and _leading_ones_dropped(t.shape) == _leading_ones_dropped(shape)):
            sd[k] = t.reshape(shape)
    unexpected = [k for k in sd if k not in expected]
    faults = [f"missing {k}" for k in expected if k not in sd]
    faults += [f"{k} is {list(logical_shape(sd[k]))}, expected {list(v)}" for k, v in expected.items()
               if k in sd and tuple(logical_shape(sd[k])) != tuple(v)]
    if faults or (unexpected and unexpected_is_fault):
        faults += [f"unexpected {k}" for k in unexpected]
        more = f" (and {len(faults) - 6} more)" if len(faults) > 6 else ""
        raise GGUFError(path, f"its tensors do not make a {what}: {'; '.join(faults[:6])}{more}")
    return unexpected
