"""Every torch and Triton internal the library relies on, each checked once, with its fallback.

A newer torch or Triton may drop an internal; then the library takes a slower, documented path and
logs one line saying so, instead of failing. (ComfyUI's internals have their own such module,
``nodes/integration/compat.py``: this package imports no ComfyUI module.)

- ``torch._C._nn._parse_to``: how ``tensor.to(...)`` reads its arguments, so that a quantized tensor
  asked for a float dtype hands back values. Fallback: the arguments read by hand (devices, dtypes
  and tensors, positional or by keyword).
- A compiled Triton kernel's launcher entry (``compiled.run.launch``, with its ``function``,
  ``packed_metadata`` and launch options), called straight with the current CUDA stream
  (``torch._C._cuda_getCurrentRawStream``): Launcher's cheapest path. Fallbacks: the compiled
  kernel's own ``compiled[grid](*args)`` (a few us more per launch, it builds launch metadata for
  Triton's hooks every time), then Triton's own launch on every call (20-40 us more per layer).
- ``QWEN_GGUF_TORCH_DEQUANT=1`` switches the Triton kernels off (the torch dequantizers run on the
  GPU instead: for comparisons).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

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


def direct_launchers(compiled) -> tuple[Callable, Callable] | None:
    """Two ways of launching Triton's compiled kernel ``compiled`` as ``compiled[grid](*args)`` does,
    ``go(grid, *args)`` with ``grid`` three numbers: the launcher entry called straight (what does
    not change between calls looked up once), and the compiled kernel's own launch, for when the
    first fails at its first call (a Triton whose entry takes other arguments). None where Triton
    hands back no compiled kernel that can be launched directly (logged once): its own launch then."""
    if not hasattr(compiled, "packed_metadata"):
        if compiled is not None:  # None: Triton's interpreter, which hands back no kernel
            _no_direct_launch()
        return None

    def own(grid, *args):
        compiled[grid](*args)
    entry = _launcher_entry(compiled)
    return (entry or own), own


# Triton releases whose launcher entry takes its arguments in the order ``go`` passes them (read in
# their driver and run on a GPU). Another release's entry might take the same number in another
# order and launch with wrong pointers instead of failing: it gets the compiled kernel's own launch.
DIRECT_LAUNCH_TRITON = ("3.6.",)


def _launcher_entry(compiled) -> Callable | None:
    """``compiled``'s launcher entry bound to what does not change between calls, or None where a
    launch needs more (scratch memory, registered launch hooks: the compiled kernel's own launch) or
    where this Triton's entry is not known."""
    run = getattr(compiled, "run", None)
    launch = getattr(run, "launch", None)
    try:
        import triton
        import triton.knobs as knobs
        if not triton.__version__.startswith(DIRECT_LAUNCH_TRITON):
            _unknown_entry(triton.__version__)
            return None
        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
        options = (run.launch_cooperative_grid, run.launch_pdl)
        plain = run.global_scratch_size == 0 and run.profile_scratch_size == 0
    except (ImportError, AttributeError):
        return None
    if launch is None or not plain or any(getattr(h, "calls", h) for h in hooks):
        return None
    compiled._init_handles()
    function, metadata = compiled.function, compiled.packed_metadata
    current_device, current_stream = torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream

    def go(grid, *args):
        launch(grid[0], grid[1], grid[2], current_stream(current_device()), function, *options, None, None,
               metadata, None, None, None, *args)
    return go


def entry_failed(error: Exception) -> None:
    """Say once that the launcher entry refused its arguments (the slower launch is taken instead)."""
    _entry_failed(f"{type(error).__name__}: {error}")


@functools.cache
def _entry_failed(error: str) -> None:
    log.info("this Triton's launcher entry takes other arguments (%s): kernels go through the compiled kernel's "
             "own launch (a few us more host time per launch)", error)


@functools.cache
def _unknown_entry(version: str) -> None:
    log.info("Triton %s's launcher entry is not one this package knows: kernels go through the compiled kernel's "
             "own launch (a few us more host time per launch)", version)


@functools.cache
def _no_direct_launch() -> None:
    log.info("this Triton's compiled kernels have no packed_metadata: kernels go through Triton's own launch "
             "(more host time per layer)")
