"""Launching Triton kernels with less host time than ``kernel[grid](...)``.

Triton's own launch re-derives the kernel's specialization from every argument, formats its compile
options into a string and checks the globals it uses, on every call: 20-40 us of host time on a
server CPU, paid per layer per step, in sampling runs that wait on the host (ComfyUI at 1024x1024 on
an H100). Here each compiled kernel is kept under a key of what Triton specializes on (each tensor's
dtype and 16-byte alignment, each integer being 1, a multiple of 16, or beyond 32 bits), the
constexprs and options, and later calls with the same key launch it directly. The first call of a
key goes through Triton as usual, and so does everything under Triton's interpreter or
torch.compile.
"""

from __future__ import annotations

import torch


def _arg_key(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0, a.get_device()
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, int):
        return int, a == 1, a % 16 == 0, -2**31 <= a < 2**31
    return type(a), a


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs_and_options)`` launches the ``@triton.jit``
    ``kernel`` as ``kernel[grid](*args, **constexprs_and_options)`` would."""

    def __init__(self, kernel):
        self.kernel = kernel
        # Per key: the compiled kernel, or False where Triton hands none back (its interpreter).
        self.compiled = {}
        # The compiled kernel takes every parameter positionally, constexprs included.
        self.params = list(kernel.arg_names)

    def __call__(self, grid: tuple, *args, **named):
        if torch.compiler.is_compiling():
            # torch.compile captures Triton's own launch into its graph.
            self.kernel[grid](*args, **named)
            return
        key = (tuple(map(_arg_key, args)), tuple(named.items()))
        compiled = self.compiled.get(key)
        if compiled:
            compiled[(grid + (1, 1))[:3]](*args, *(named[p] for p in self.params[len(args):]))
            return
        launched = self.kernel[grid](*args, **named)
        if compiled is None:
            self.compiled[key] = launched if hasattr(launched, "packed_metadata") else False
