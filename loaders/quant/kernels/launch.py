"""Launching Triton kernels with less host time than ``kernel[grid](...)``.

Triton's own launch re-derives the kernel's specialization from every argument, formats its compile
options into a string and checks the globals it uses, on every call: 20-40 us of host time on a
server CPU, paid per layer per step, in sampling runs that wait on the host (ComfyUI at 1024x1024 on
an H100). A ``Launcher`` binds a kernel's constexprs and options once, keeps each compiled kernel
under a key of what Triton specializes the remaining arguments on (each tensor's dtype, 16-byte
alignment and device, each integer being 1, a multiple of 16, or beyond 32 bits), and on later calls
with the same key calls the compiled kernel's launcher entry straight (``compat.direct_launchers``).
A caller that knows most of that key ahead (a layer's dequant: one weight, one shape) gives the rest
itself (``keyed``) instead of having every argument looked at. The first call of a key goes through
Triton as usual, and so does everything under Triton's interpreter or torch.compile.
"""

from __future__ import annotations

import torch

from ...compat import direct_launchers, entry_failed


def _arg_key(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0, a.get_device()
    return int_key(a) if isinstance(a, int) and not isinstance(a, bool) else (type(a), a)


def int_key(a: int) -> tuple:
    """What Triton specializes an integer argument on."""
    return int, a == 1, a % 16 == 0, -2**31 <= a < 2**31


class Launcher:
    """``Launcher(kernel, **constexprs_and_options)(grid, *args)`` launches the ``@triton.jit``
    ``kernel`` as ``kernel[grid](*args, **constexprs_and_options)`` would; ``grid`` is three numbers."""

    def __init__(self, kernel, **named):
        # Only attributes are set here: torch.compile traces this constructor (a launcher made in a
        # compiled region) and cannot read the kernel's own attributes.
        self.kernel, self.named = kernel, named
        # The bound parameters in the kernel's order, worked out at the first direct launch: the
        # compiled kernel takes every parameter positionally, the bound ones after the call's.
        self.tail = None
        # Per key: how to launch it directly, or False where Triton hands no kernel back (its interpreter).
        self.compiled = {}

    def __call__(self, grid: tuple, *args) -> None:
        if torch.compiler.is_compiling():
            # torch.compile captures Triton's own launch into its graph.
            self.kernel[grid](*args, **self.named)
            return
        self.keyed(tuple(map(_arg_key, args)), grid, *args)

    def keyed(self, key, grid: tuple, *args) -> None:
        """The launch, with ``key`` telling apart every specialization Triton would make of ``args``
        (given by a caller that knows most of it ahead; not for traced code)."""
        go = self.compiled.get(key)
        if go:
            go(grid, *args, *self.tail)
            return
        launched = self.kernel[grid](*args, **self.named)
        if go is None:
            ways = direct_launchers(launched)
            self.compiled[key] = self._on_trial(key, *ways) if ways else False
            if self.tail is None:
                self.tail = tuple(self.named[p] for p in self.kernel.arg_names if p in self.named)

    def _on_trial(self, key, fast, fallback):
        """``fast``, once its first call went through; ``fallback`` from then on if it refused its
        arguments (refused before launching anything, so the fallback launches once)."""
        def first(grid, *args):
            try:
                fast(grid, *args)
            except TypeError as e:
                entry_failed(e)
                self.compiled[key] = fallback
                fallback(grid, *args)
                return
            self.compiled[key] = fast
        return first
