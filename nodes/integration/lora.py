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
model is loaded, held by the layer's plan; a callback drops them when ComfyUI unloads the model.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import compat

Factors = tuple[torch.Tensor, torch.Tensor]
# Per layer (held by its plan): (device, dtype) -> (the patch's entries, their factors or None). Not by
# patch object: ComfyUI makes new ones at every load, with the same entries.
FactorCache = dict


def apply_patches(weight: torch.Tensor, patches: Iterable[Callable], cache: FactorCache) -> torch.Tensor:
    """``weight`` (freshly dequantized, so it may be changed in place) with ComfyUI's patch functions applied."""
    for patch in patches:
        factors = low_rank_factors(patch, weight.device, weight.dtype, cache)
        if factors is not None and (factors[0].shape[0], factors[1].shape[1]) == tuple(weight.shape):
            weight = weight.addmm_(*factors)
        else:
            weight = patch(weight)
    return weight


def low_rank_factors(patch: Callable, device: torch.device, dtype: torch.dtype, cache: FactorCache) -> Factors | None:
    """(up, down) with up @ down equal to the patch's weight difference, or None if it is not plain LoRA."""
    entries = compat.lowvram_patch_entries(patch)
    if entries is None:
        return None
    key = (device, dtype)
    hit = cache.get(key)
    # A patch object outlives no change of its list in ComfyUI, but a stale cache would be silent.
    if hit is None or len(hit[0]) != len(entries) or any(a is not b for a, b in zip(hit[0], entries)):
        hit = cache[key] = (entries, _factor(entries, device, dtype))
    return hit[1]


def _factor(entries: tuple, device: torch.device, dtype: torch.dtype) -> Factors | None:
    ups, downs = [], []
    for strength, adapter, strength_model, offset, function in entries:
        parts = compat.lora_factors(adapter)
        if parts is None or strength_model != 1.0 or offset is not None or function is not None:
            return None
        up, down, alpha = parts
        scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        ups.append(up.flatten(start_dim=1).to(device, torch.float32) * scale)
        downs.append(down.flatten(start_dim=1).to(device, torch.float32))
    if not ups:
        return None
    return torch.cat(ups, dim=1).to(dtype), torch.cat(downs, dim=0).to(dtype)
