"""One execution plan per layer: how a linear layer whose weight is quantized bytes runs.

Everything that does not change from call to call is decided when the layer is loaded: which path
its format takes on its device (the Triton dequant kernel bound to the weight's shape and the GPU's
tile, the fused kernel's row limit for it, fp8 matmuls and their operands, or the torch
dequantizer), and in fp8 mode the activation quantization it shares with its neighbours. A call
then only looks at what does change: the input's rows and dtype, and where the bytes are.

    plan = bind(fmt, shape, device)
    y = plan(x, raw, bias)            # linear(x, W, bias), W the bytes ``raw`` of fmt and shape
    w = plan.weight(raw, dtype)       # W itself (LoRA patches apply to it)

Where a model runs in the cached or fp8 mode and its converted weights fit the device, its plans
share a ``DeviceCopies``: each layer converts its bytes on the device the first time it runs them
there (dequantized to the compute dtype, or requantized to FP8 rows), and from then on runs the copy
(``plan.copy``) without its bytes. Loading stays as fast as on the fly; the conversion costs the
first step milliseconds on a GPU.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Callable

import torch

from ..compat import triton_kernels
from .formats import Format
from .fp8 import FP8Rows, FP8Weight, SharedInput, can_hold, fast_path, fp8_linear, operands, row_scales

log = logging.getLogger(__name__)

# Up to 16 rows of input the fused kernel runs every weight of a type it suits (bench/fused_matmul.py,
# every type): on weights of 32M elements and more it beats dequant + cuBLAS on the GPU, splitting K
# between programs where a tile of rows leaves SMs idle; on smaller ones the GPU time of either is a
# few microseconds and its one launch (unsplit) costs less host time than dequant + cuBLAS's two, on
# the host-bound path of a text encoder generating. With more rows the tensor cores of cuBLAS win.
# The rule depends only on shapes and types, so it is the same in eager and compiled runs.
FUSED_MAX_ROWS = 16
FUSED_SPLIT_ELEMENTS = 32 << 20
# Rows beyond which even QWEN_GGUF_FUSED=on does not use the fused kernel (dequant + cuBLAS wins long before).
FORCED_MAX_ROWS = 512
# "auto" (the rule above), "on" (fused wherever the kernel applies: for benchmarks) or "off".
FUSED_CHOICES = ("auto", "on", "off")
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def fused_choice(value: str) -> str:
    """The QWEN_GGUF_FUSED setting ``value``, or "auto" (with a warning saying so) for anything else."""
    if value in FUSED_CHOICES:
        return value
    log.warning("QWEN_GGUF_FUSED=%r is not one of %s: using auto", value, ", ".join(FUSED_CHOICES))
    return "auto"


FUSED = fused_choice(os.environ.get("QWEN_GGUF_FUSED", "auto"))


def fused_rows(fmt: type[Format], shape, setting: str | None = None) -> int:
    """Up to how many rows of input a CUDA layer of ``fmt`` and ``shape`` takes the fused kernel (0: never)."""
    setting = setting or FUSED
    if setting == "off" or fmt.tile is None:
        return 0
    if setting == "on":  # any type with a kernel, IQ4_NL included
        return FORCED_MAX_ROWS
    return FUSED_MAX_ROWS if fmt.fused else 0


class DeviceCopies:
    """A model's converted copies of its weights on the device (cached and fp8 modes): made by each
    layer's plan the first time it runs its bytes resident there, while at least ``reserve`` bytes
    stay free (``free_memory(device)`` tells), and dropped all at once (``drop``) when the model is
    unloaded or its memory is asked for."""

    def __init__(self, fp8: bool, dtype: torch.dtype, device: torch.device, reserve: int,
                 free_memory: Callable[[torch.device], int]):
        self.fp8, self.dtype, self.device_type = fp8, dtype, torch.device(device).type
        self.reserve, self.free_memory = reserve, free_memory
        self.holders: list[LinearPlan] = []
        self.held = 0
        # Set at the first copy refused, until the copies are dropped: the layers without one then
        # ask no more (asking for the free memory costs host time on every call).
        self.full = False

    def admit(self, need: int, device: torch.device) -> bool:
        """Whether ``need`` bytes may be taken now (refused once, nothing more is until a drop)."""
        if not self.full:
            self.full = self.free_memory(device) - need < self.reserve
        return not self.full

    def add(self, plan: "LinearPlan", nbytes: int) -> None:
        self.holders.append(plan)
        self.held += nbytes

    def drop(self) -> int:
        """Free every copy; returns the bytes they held."""
        freed = self.held
        for plan in self.holders:
            plan.copy = None
        self.holders, self.held, self.full = [], 0, False
        return freed


class Copy:
    """A layer's weight held converted on the device (and its bias, copied: the bias ComfyUI hands a
    layer may be a view into memory it reuses), run without the bytes. ``source`` is the bias it was
    made from (weakly: holding it would keep the memory it views) and that tensor's version then, so
    that a caller can tell the bias changed since."""
    __slots__ = ("weight", "bias", "dtype", "device", "source")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 source: torch.Tensor | None = None):
        self.weight, self.bias = weight, None if bias is None else bias.clone()
        self.dtype, self.device = dtype, weight.device
        self.source = (None if source is None else weakref.ref(source), _version(source))

    def made_from(self, bias: torch.Tensor | None) -> bool:
        """Whether ``bias`` is the tensor this copy's bias came from, unchanged since (as far as torch
        tells: an inference tensor keeps no version, and then only its identity counts)."""
        ref, version = self.source
        source = None if ref is None else ref()
        if ref is not None and source is None:  # gone: whatever ``bias`` is, it is another tensor
            return False
        return bias is source and (version is None or bias._version == version)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _version(t: torch.Tensor | None) -> int | None:
    """``t``'s version counter (bumped by every in-place change), None where it keeps none."""
    if t is None or t.is_inference():
        return None
    return t._version


class FP8Copy(Copy):
    """A weight requantized to FP8 rows on the device, run with fp8 matmuls (see fp8)."""
    __slots__ = ("operands", "plan")

    def __init__(self, raw: torch.Tensor, shape, bias: torch.Tensor | None, plan: "LinearPlan",
                 source: torch.Tensor | None = None):
        super().__init__(raw, bias, torch.bfloat16, source)
        self.operands, self.plan = operands(raw, shape), plan

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        shared = None if torch.compiler.is_compiling() else plan.shared
        return fp8_linear(x, self.operands, self.bias, shared, plan.last)


class LinearPlan:
    """The torch path: the weight dequantized by its format's torch code, then a matmul (a CPU, or a
    format without a kernel)."""

    # The model's DeviceCopies where its converted weights are held on the device, and this layer's copy.
    copies: DeviceCopies | None = None
    copy: Copy | None = None
    # In fp8 mode: the activation quantization this layer shares with the layers reading the same
    # input (see fp8.SharedInput), and whether it is the group's last member (which lets go of it).
    shared: SharedInput | None = None
    last = True

    def __init__(self, fmt: type[Format], shape):
        self.fmt, self.shape = fmt, torch.Size(shape)
        # LoRA patches in low-rank form, kept while the model is loaded (filled by ComfyUI's side).
        self.factors: dict = {}

    def weight(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.fmt.dequantize(raw, self.shape, dtype)

    def __call__(self, x: torch.Tensor, raw: torch.Tensor, bias: torch.Tensor | None = None,
                 resident: bool = False) -> torch.Tensor:
        """``linear(x, W, bias)``, with W the contiguous bytes ``raw`` on ``x``'s device; ``resident``
        says the bytes stay where they are between calls (a copy may be made of them)."""
        if resident and self.copies is not None and self.copy is None and x.dtype == self.copies.dtype:
            copy = self.make_copy(raw, bias)
            if copy is not None:
                return copy(x)
        self.release()
        return self.run(x, raw, bias)

    def run(self, x: torch.Tensor, raw: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight(raw, x.dtype), bias)

    def make_copy(self, raw: torch.Tensor, bias: torch.Tensor | None) -> Copy | None:
        """This layer's copy of the bytes ``raw`` (and ``bias``), if the model's DeviceCopies admits
        one (none in traced code: a compiled graph keeps no state)."""
        copies = self.copies
        as_fp8 = copies.fp8 and can_hold(self.shape)
        numel = self.shape.numel()
        nbytes = numel * (1 if as_fp8 else copies.dtype.itemsize)
        # Requantizing passes through fp32 temporaries of about 8 bytes per element.
        if torch.compiler.is_compiling() or not copies.admit(nbytes + (8 * numel if as_fp8 else 0), raw.device):
            return None
        source = bias
        if bias is not None:
            bias = bias.to(copies.dtype)
        if as_fp8:
            copy = FP8Copy(FP8Rows.encode(self.weight(raw, torch.float32)), self.shape, bias, self, source)
        else:
            copy = Copy(self.weight(raw, copies.dtype), bias, copies.dtype, source)
        self.copy = copy
        copies.add(self, nbytes)
        return copy

    @property
    def quantizes_input(self) -> bool:
        """Whether this layer's matmuls take fp8-quantized input (so may share that quantization)."""
        return self.copies is not None and self.copies.fp8

    def share(self, shared: SharedInput, last: bool) -> None:
        self.shared, self.last = shared, last

    def release(self) -> None:
        """On the paths that take no fp8 matmul: the group's last member still lets go of the shared
        quantization."""
        if self.shared is not None and self.last and not torch.compiler.is_compiling():
            self.shared.release()

    def drop_device_state(self) -> None:
        """Forget what was made for the loaded model (when it is unloaded)."""
        self.factors.clear()


class KernelPlan(LinearPlan):
    """On CUDA: the Triton dequant kernel bound to this weight, then cuBLAS; or for few rows of input
    on a large weight, the fused kernel reading the blocks in the matmul's loop."""

    def __init__(self, fmt: type[Format], shape, device: torch.device, fused: str | None = None):
        from .kernels.dequant import Dequantizer
        from .kernels.matmul import FusedMatmul
        super().__init__(fmt, shape)
        self.dequantize = Dequantizer(fmt, shape, device)
        self.fused_rows = fused_rows(fmt, self.shape, fused)
        self.fused = FusedMatmul(fmt, self.shape, device, may_split=self.shape.numel() >= FUSED_SPLIT_ELEMENTS) \
            if self.fused_rows else None
        self.in_features = self.shape[1]

    def weight(self, raw, dtype):
        # Bytes a caller moved to the CPU (ComfyUI does for a layer it runs there) take the torch path.
        return self.dequantize(raw, dtype) if raw.is_cuda else self.fmt.dequantize(raw, self.shape, dtype)

    def run(self, x, raw, bias):
        if 0 < x.numel() // self.in_features <= self.fused_rows and x.dtype in _FUSED_DTYPES and raw.is_cuda:
            return self.fused(x, raw, bias)
        return torch.nn.functional.linear(x, self.weight(raw, x.dtype), bias)


class FP8StreamPlan(KernelPlan):
    """The fp8-on-the-fly mode: the bytes stay GGUF blocks (their memory), and each call decodes them
    straight to FP8 rows (kernels.fp8_rows, 1 byte per element) for an fp8 matmul with per-token
    activation scales: for inputs of more rows than the fused kernel takes, the fp8 compute mode's
    arithmetic value for value, at on the fly's memory.
    The row scales (the dequantized rows' maxima) are worked out the first time the layer runs on
    its device and kept there while the model is loaded. Few rows take the fused kernel, and
    anything but bf16 input (the NaN guard's fp32 redo) the exact path, as on the fly."""

    def __init__(self, fmt: type[Format], shape, device: torch.device, fused: str | None = None):
        from .kernels.fp8_rows import FP8RowsDecoder
        super().__init__(fmt, shape, device, fused)
        self.decode = FP8RowsDecoder(fmt, self.shape)
        # The rows' scales on the device the bytes were last run on, and how that device runs fp8 matmuls.
        self.scales: torch.Tensor | None = None
        self.path: str | None = None

    def __call__(self, x, raw, bias=None, resident=False):
        # No release first (LinearPlan's): the fp8 path uses the shared quantization, and lets it go
        # itself where it is the group's last member.
        return self.run(x, raw, bias)

    def run(self, x, raw, bias):
        if (x.dtype != torch.bfloat16 or not raw.is_cuda
                or x.numel() // self.in_features <= self.fused_rows):
            self.release()
            return super().run(x, raw, bias)
        scales = self.scales
        if scales is None or scales.device != raw.device:
            scales = self.row_scales(raw)
        n, k = self.shape
        w = FP8Weight(self.decode(raw, scales).t(), scales.view(1, n), (n, k), self.path)
        shared = None if torch.compiler.is_compiling() else self.shared
        return fp8_linear(x, w, bias, shared, self.last)

    @torch.compiler.disable
    def row_scales(self, raw: torch.Tensor) -> torch.Tensor:
        """The rows' scales, as ``fp8.quantize_rows`` takes them, worked out and kept (outside any
        traced graph: a compiled model computes them once too, then recompiles with them kept)."""
        from .kernels.dequant import dequantize_cuda
        self.scales = row_scales(raw, self.shape, lambda rows, shape: dequantize_cuda(rows, self.fmt, shape,
                                                                                     torch.float32))
        self.path = fast_path(raw.device)
        return self.scales

    quantizes_input = True

    def drop_device_state(self) -> None:
        super().drop_device_state()
        self.scales = None


class FP8Plan(LinearPlan):
    """Bytes stored as FP8 rows (the fp8 mode's conversion at load): fp8 matmuls with per-token
    activation scales where the device has them (see fp8); the operands of resident bytes kept while
    the bytes stay."""

    quantizes_input = True

    def __init__(self, shape):
        super().__init__(FP8Rows, shape)
        self.kept: tuple[torch.Tensor, FP8Weight] | None = None

    def operands(self, raw: torch.Tensor) -> FP8Weight:
        kept = self.kept
        if kept is not None and kept[0] is raw:
            return kept[1]
        return operands(raw, self.shape)

    def __call__(self, x, raw, bias=None, resident=False):
        w = self.operands(raw)
        if resident and not torch.compiler.is_compiling():
            self.kept = (raw, w)
        shared = None if torch.compiler.is_compiling() else self.shared
        return fp8_linear(x, w, bias, shared, self.last)

    def drop_device_state(self) -> None:
        super().drop_device_state()
        self.forget_kept()

    def forget_kept(self) -> None:
        """Let go of the kept operands (ComfyUI may have moved the bytes they view)."""
        self.kept = None


def bind(fmt: type[Format], shape, device: torch.device | str, fused: str | None = None,
         fp8: bool = False) -> LinearPlan:
    """The plan of a ``fmt`` weight of logical ``shape`` computing on ``device``; ``fp8``: in the
    fp8-on-the-fly mode, where the device has fp8 matmuls and the shape suits them."""
    device = torch.device(device)
    if fmt is FP8Rows:
        return FP8Plan(shape)
    if device.type == "cuda" and fmt.tile is not None and triton_kernels():
        if fp8 and can_hold(shape) and fast_path(device) is not None:
            return FP8StreamPlan(fmt, shape, device, fused)
        return KernelPlan(fmt, shape, device, fused)
    return LinearPlan(fmt, shape)


def quantized_linear(x: torch.Tensor, raw: torch.Tensor, fmt: type[Format], shape,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, W, bias)`` once, for W the contiguous bytes ``raw`` of ``fmt`` and logical ``shape``
    on ``x``'s device (a layer binds its plan once instead)."""
    return bind(fmt, shape, raw.device)(x, raw.contiguous(), bias)
