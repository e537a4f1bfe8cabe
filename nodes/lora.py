"""LoRA patches on dequantized GGUF weights, applied in low-rank form.

Where ComfyUI cannot merge a LoRA into a weight once (its dynamic VRAM loader and partial loads patch
each layer as it runs, and a quantized weight cannot hold a merged result), its per-layer patch
recomputes the LoRA from scratch on every forward: both matrices moved to the device, multiplied out
to a full-size difference, scaled, cast and added. For plain LoRA patches (ComfyUI's LoRA adapter
without DoRA, LoCon mid weight, offset or function; several stacked are fine) the patch list of a
layer is instead turned once, per device and dtype, into a single pair of device matrices: the up
matrices side by side, each pre-scaled by its strength and alpha / rank, and the down matrices
stacked. Each forward then adds them to the freshly dequantized weight with one addmm. Other patch
kinds (LoHa, LoKr, diffs, ...), and LoRAs whose shapes do not match the weight (which ComfyUI skips
with a logged error), go through ComfyUI's own patch function. The factors live on the GPU while the
model is loaded; a callback drops them when ComfyUI unloads the model.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

import comfy.model_patcher
from comfy.weight_adapter.lora import LoRAAdapter

Factors = tuple[torch.Tensor, torch.Tensor]
_CACHE = "_qwen_gguf_low_rank"


def apply_patches(weight: torch.Tensor, patches: Iterable[Callable]) -> torch.Tensor:
    """``weight`` (freshly dequantized, so it may be changed in place) with ComfyUI's patch functions applied."""
    for patch in patches:
        factors = low_rank_factors(patch, weight.device, weight.dtype)
        if factors is not None and (factors[0].shape[0], factors[1].shape[1]) == tuple(weight.shape):
            weight = weight.addmm_(*factors)
        else:
            weight = patch(weight)
    return weight


def low_rank_factors(patch: Callable, device: torch.device, dtype: torch.dtype) -> Factors | None:
    """(up, down) with up @ down equal to the patch's weight difference, or None if it is not plain LoRA."""
    if not isinstance(patch, comfy.model_patcher.LowVramPatch):
        return None
    entries = tuple(patch.patches[patch.key])
    cached = patch.__dict__.setdefault(_CACHE, {})
    hit = cached.get((device, dtype))
    # A patch object outlives no change of its list in ComfyUI, but a stale cache would be silent.
    if hit is None or len(hit[0]) != len(entries) or any(a is not b for a, b in zip(hit[0], entries)):
        hit = cached[(device, dtype)] = (entries, _factor(entries, device, dtype))
    return hit[1]


def drop_factors(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Free the factors held for the model's layers (when ComfyUI unloads it)."""
    for patch in _patch_functions(patcher.model):
        patch.__dict__.pop(_CACHE, None)


def cached_factor_count(model: torch.nn.Module) -> int:
    """How many layers' patch functions hold factors (for tests and logs)."""
    return sum(_CACHE in patch.__dict__ for patch in _patch_functions(model))


def _patch_functions(model: torch.nn.Module):
    for module in model.modules():
        found = getattr(module, "weight_lowvram_function", None)
        for patch in [found, *getattr(module, "weight_function", [])]:
            if patch is not None and hasattr(patch, "__dict__"):
                yield patch


def _factor(entries: tuple, device: torch.device, dtype: torch.dtype) -> Factors | None:
    ups, downs = [], []
    for strength, adapter, strength_model, offset, function in entries:
        if (type(adapter) is not LoRAAdapter or strength_model != 1.0 or offset is not None
                or function is not None):
            return None
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if mid is not None or dora_scale is not None or reshape is not None:
            return None
        scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        ups.append(up.flatten(start_dim=1).to(device, torch.float32) * scale)
        downs.append(down.flatten(start_dim=1).to(device, torch.float32))
    if not ups:
        return None
    return torch.cat(ups, dim=1).to(dtype), torch.cat(downs, dim=0).to(dtype)
