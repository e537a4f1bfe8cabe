"""Every torch and Triton internal the library relies on, each checked once, with its fallback.

A newer torch or Triton may drop an internal; then the library takes a slower, documented path and
logs one line saying so, instead of failing. (ComfyUI's internals have their own such module,
``nodes/integration/compat.py``: this package imports no ComfyUI module.)

- ``torch._C._nn._parse_to``: how ``tensor.to(...)`` reads its arguments, so that a quantized tensor
  asked for a float dtype hands back values. Fallback: the arguments read by hand (devices, dtypes
  and tensors, positional or by keyword).
- A compiled Triton kernel's direct launch (``compiled[grid](*args)``, which needs its
  ``packed_metadata``): Launcher's cheap path. Fallback: Triton's own launch on every call (20-40 us
  more host time per layer).
- ``QWEN_GGUF_TORCH_DEQUANT=1`` switches the Triton kernels off (the torch dequantizers run on the
  GPU instead: for comparisons).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


def _parse_to_by_hand(*args, **kwargs) -> tuple[torch.device | None, torch.dtype | None, bool, object]:
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
        elif isinstance(arg, (str, int, torch.device)):
            device = arg
    return (torch.device(device) if device is not None else None), dtype, kwargs.get("non_blocking", False), None


def _pick_parse_to():
    parse_to = getattr(getattr(torch._C, "_nn", None), "_parse_to", None)
    if parse_to is None:
        log.info("torch %s has no torch._C._nn._parse_to: quantized tensors read .to() arguments by hand",
                 torch.__version__)
        return _parse_to_by_hand
    return parse_to


parse_to = _pick_parse_to()


@functools.lru_cache(maxsize=1)
def triton_kernels() -> bool:
    """Whether the Triton kernels run here: a CUDA GPU, Triton importable, and not switched off."""
    if os.environ.get("QWEN_GGUF_TORCH_DEQUANT") == "1" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("Triton is not installed: GGUF weights are dequantized with torch (slower)")
        return False
    return True


def direct_launch(compiled) -> bool:
    """Whether Triton's compiled kernel ``compiled`` can be launched directly; logs once if it cannot."""
    if hasattr(compiled, "packed_metadata"):
        return True
    if compiled is not None:  # None: Triton's interpreter, which hands back no kernel
        _no_direct_launch()
    return False


@functools.cache
def _no_direct_launch() -> None:
    log.info("this Triton's compiled kernels have no packed_metadata: kernels go through Triton's own launch "
             "(more host time per layer)")
