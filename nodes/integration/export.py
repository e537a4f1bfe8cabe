"""A loaded MODEL's diffusion model as a checkpoint to convert, its patches (LoRAs) merged.

A MODEL from any loader (ours, or ComfyUI's bf16 and fp8 ones) saves the same way: each tensor is
read as stored before any patch, made float32 and merged with the MODEL's own patches when the
writer reaches it, so memory stays at one tensor and a model ComfyUI has already patched (or a
clone sharing it) is not merged twice.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from ...loaders.convert.checkpoint import Checkpoint, describe_diffusion
from ...loaders.quant.weight import dequantize_bytes
from . import compat
from .ops import FileWeights

PREFIX = "diffusion_model."


def _tensors(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], FileWeights | None]]:
    """Each weight and persistent buffer (not the extra state-dict entries of ComfyUI's quantized
    ops, such as their scales) with its logical shape, and our op where it holds quantized bytes."""
    saved = set(model.state_dict(keep_vars=True))  # persistent buffers are saved, the others are not
    out = {name: (tuple(t.shape), None) for name, t in (*model.named_parameters(), *model.named_buffers())
           if name in saved}
    for module_name, module in model.named_modules():
        if isinstance(module, FileWeights) and module.plan is not None:
            out[f"{module_name}.weight"] = (tuple(module.plan.shape), module)
    return out


def model_checkpoint(patcher, name: str) -> Checkpoint:
    """The diffusion model of ``patcher`` (a ComfyUI MODEL) as a Checkpoint in ComfyUI's names;
    ``name`` is what messages call it."""
    diffusion = patcher.model.diffusion_model
    tensors = _tensors(diffusion)
    shapes = {key: shape for key, (shape, _) in tensors.items()}
    arch, variant, layers = describe_diffusion(name, shapes)

    def load(key: str) -> torch.Tensor:
        weight, convert = compat.stored_weight(patcher, PREFIX + key)
        op = tensors[key][1]
        if op is not None and weight.dtype == torch.uint8:  # our quantized bytes
            w = dequantize_bytes(weight.detach().cpu(), op.plan.fmt, op.plan.shape, torch.float32)
        else:
            w = compat.to_cpu_float(weight)
            if convert is not None:
                w = convert(w, inplace=True)
        return compat.merge_patches(patcher, PREFIX + key, w.float())

    # bf16 holds every value of a model that computes in it; F16 could overflow.
    dtypes = {p.dtype for p in diffusion.parameters()} | {
        m.compute_dtype for m in diffusion.modules() if isinstance(m, FileWeights)}
    return Checkpoint(name, "diffusion_model", arch, variant, layers, shapes, load,
                      T.BF16 if torch.bfloat16 in dtypes else T.F16)
