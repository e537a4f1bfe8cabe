"""Runs inside a started ComfyUI (see comfy_runner.py): where ComfyUI's internals changed, compat's
start-up check logs one line each and the layers take their fallback paths with the same results.

The changes are simulated by hiding each internal while ``compat.check()`` looks; the model then runs
with what the check chose (no CastBiasWeightContext, no dynamic-loader marks, no LowVramPatch
fields), a LoRA applied per layer in a partial load, against the run with everything present."""

import logging

import torch

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
from script_helpers import loaded_module, ours_and_native


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(cfg):
    ours, native, lora, dm = ours_and_native(cfg)
    compat = loaded_module(cfg, cfg["package"]).nodes.integration.compat
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)
    context = torch.randn(1, 8, 256, generator=g)
    sigma = torch.tensor([0.7])
    patched = comfy.sd.load_lora_for_models(ours, None, lora, 1.0, 0.0)[0]

    calls = []
    calculate_weight = comfy.lora.calculate_weight

    def counted(*args, **kwargs):  # ComfyUI's own (full-size) LoRA math
        calls[-1] += 1
        return calculate_weight(*args, **kwargs)

    def forward():
        calls.append(0)
        patched.load(mm.get_torch_device(), lowvram_model_memory=1)  # every layer patched as it runs
        comfy.lora.calculate_weight = counted
        try:
            with torch.no_grad():
                out = patched.model.apply_model(x, sigma, c_crossattn=context)
        finally:
            comfy.lora.calculate_weight = calculate_weight
        patched.partially_unload(mm.unet_offload_device(), memory_to_free=1 << 40)
        patched.detach()
        return out

    present = forward()
    lines = Lines()
    logging.getLogger(compat.__name__).addHandler(lines)
    saved = (comfy.ops.CastBiasWeightContext, comfy.ops.cast_bias_weight, comfy.model_patcher.LowVramPatch,
             comfy.ops.CastWeightBiasOp.comfy_cast_weights)

    class OtherPatch:  # a LowVramPatch whose fields moved
        def __init__(self, key, patches, convert_func=None, set_func=None):
            self.entries = patches

    def cast_bias_weight(*args, **kwargs):  # the same function, its source no longer naming _v
        return saved[1](*args, **kwargs)

    try:
        del comfy.ops.CastBiasWeightContext
        del comfy.ops.CastWeightBiasOp.comfy_cast_weights
        comfy.ops.cast_bias_weight = cast_bias_weight
        comfy.model_patcher.LowVramPatch = OtherPatch
        compat.check()
    finally:
        comfy.ops.CastBiasWeightContext, comfy.ops.cast_bias_weight, comfy.model_patcher.LowVramPatch = saved[:3]
        comfy.ops.CastWeightBiasOp.comfy_cast_weights = saved[3]
    features = {k: getattr(compat.Features, k) for k in ("dynamic_marks", "low_rank_lora", "fp32_redo")}
    features["cast"] = compat.Features.cast.__name__
    fallback = forward()
    compat.check()
    restored = {k: getattr(compat.Features, k) for k in ("dynamic_marks", "low_rank_lora", "fp32_redo")}
    return {"lines": lines.lines, "features": features, "restored": restored, "full_lora_math_calls": calls,
            "fallback_vs_present": ((fallback - present).norm() / present.norm()).item()}
