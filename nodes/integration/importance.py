"""Collecting an importance matrix while a MODEL samples: an APPLY_MODEL wrapper on a clone of the
MODEL hooks the inputs of every Linear layer of its diffusion model for the length of each call, so
the original MODEL (and every other clone) runs unhooked."""

from __future__ import annotations

import torch

import comfy.patcher_extension

from ...loaders.convert.imatrix import ImportanceCollector

WRAPPER_KEY = "qwen_image_gguf_importance"


def _linear_layers(diffusion_model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    # ComfyUI's ops (ours included) subclass torch's Linear; the names are the weights' names in a
    # GGUF saved from this MODEL.
    return [(f"{name}.weight", m) for name, m in diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]


def collecting(model, collector: ImportanceCollector):
    """A clone of ``model`` (a ComfyUI MODEL) whose sampling adds its Linear layers' inputs to
    ``collector``."""
    layers = _linear_layers(model.model.diffusion_model)

    def apply_model(executor, *args, **kwargs):
        def hook_for(name):
            return lambda _module, inputs: collector.add(name, inputs[0])
        handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers]
        try:
            out = executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        collector.calls += 1
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return clone
