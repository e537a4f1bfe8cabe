"""A guard for any MODEL: a sampling step whose output holds NaN or inf is redone in fp32, and only
if that fails too does sampling stop, with an error that names the step, the sigma and the cause,
instead of running on to a black image."""

from __future__ import annotations

import logging

import torch

import comfy.patcher_extension

from ...loaders.gguf.errors import GGUFError
from ...loaders.quant.health import damage_report
from . import compat
from .ops import FileWeights

log = logging.getLogger(__name__)

WRAPPER_KEY = "qwen_image_gguf_nan_guard"
# The attribute of a BaseModel built from a GGUF file that holds the file's path.
GGUF_PATH = "qwen_image_gguf_path"


class NonFiniteModelOutput(RuntimeError):
    pass


def _step(sigma: torch.Tensor, transformer_options: dict) -> str:
    sigmas = transformer_options.get("sample_sigmas")
    s = float(sigma.flatten()[0])
    if sigmas is None or len(sigmas) < 2:
        return f"sigma {s:.4g}"
    index = int((sigmas.float().cpu() - s).abs().argmin())
    return f"step {index + 1} of {len(sigmas) - 1} (sigma {s:.4g})"


def file_weights(module: torch.nn.Module):
    """(name, tensor) of every weight, GGUF block bytes as quantized tensors that know their type."""
    for name, layer in module.named_modules():
        if isinstance(layer, FileWeights) and layer.quantized():
            yield f"{name}.weight", layer.quantized_weight()
    yield from ((n, p) for n, p in module.named_parameters() if p.dtype != torch.uint8)


def _cause(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "fp16 compute overflows Qwen-Image; run it in bf16 or fp32"
    return ("the inputs are not finite or a LoRA / patch makes the weights overflow "
            "(try without LoRAs, or check the conditioning and latent)")


def guard_apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if torch.isfinite(out).all():
        return out
    model = compat.wrapped_model(executor)
    dtype = model.get_dtype_inference()
    where = _step(t, transformer_options)
    if compat.Features.fp32_redo:
        log.warning("NaN guard: model output at %s holds NaN/inf in %s; redoing the step in fp32", where, dtype)
        with compat.computing_in_fp32(model):
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if torch.isfinite(out).all():
            return out
        what = f"NaN guard: the model output at {where} holds NaN/inf, also when recomputed in fp32 (it computed in {dtype})"
    else:
        what = f"NaN guard: the model output at {where} holds NaN/inf (it computed in {dtype})"
    damage = damage_report(file_weights(model.diffusion_model))
    if damage:
        # A damaged file is the file's fault: named like every other bad-file error.
        raise GGUFError(getattr(model, GGUF_PATH, None), f"{what}: {damage}, it is damaged; download it again")
    raise NonFiniteModelOutput(f"{what}. Likely cause: {_cause(dtype)}.")


def add_guard(model):
    guarded = model.clone()
    guarded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, guard_apply_model)
    return guarded
