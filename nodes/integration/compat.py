"""Every ComfyUI internal this package relies on, in one place, checked once at start-up.

ComfyUI's public surface for custom ops is small; where we need more, it is reached from here only,
so that a ComfyUI change breaks one module, and ``check()`` (run when ComfyUI loads the package)
finds it first: an internal that moved logs one line naming it and the slower path taken instead,
or, where there is none, the feature it disables. What we use and why:

- ``comfy.ops.CastBiasWeightContext`` (public): the weight's bytes brought to the input's device by
  ComfyUI's offload streams and dynamic VRAM loader. Fallback: ``cast_bias_weight`` /
  ``uncast_bias_weight``, the functions the context wraps.
- ``weight_function`` / ``weight_lowvram_function`` (and the bias's): the patches ComfyUI sets on a
  layer. They expect float weights, so they are hidden while the bytes are cast and applied after
  dequantizing (``hidden_patches``).
- ``_v`` and ``_v_weight``: the dynamic VRAM loader's mark on the layers it manages and its resident
  copy of the weight. Without them every layer goes through the cast, and nothing is made of the
  bytes it brings to keep (no converted copies, fp8 operands remade per call: slower, same results).
- ``comfy.model_patcher.LowVramPatch`` (``patches``, ``key``) and ``LoRAAdapter.weights``: what a
  per-layer patch holds, read to apply plain LoRAs in low-rank form. Fallback: ComfyUI's own patch
  function (a full-size weight difference per call).
- ``convert_weight`` / ``set_weight``: the hooks ComfyUI's patcher calls on an op (``get_key_weight``)
  to merge a LoRA into a weight. There is no other way to merge into quantized bytes: if ComfyUI
  stops calling them, ``check()`` warns that this package needs an update.
- ``get_key_weight``, ``ModelPatcher.backup`` and ``comfy.lora.calculate_weight``: how ComfyUI's
  patcher reads a weight, keeps it while patched and merges its patches, used the same way to save a
  MODEL with its LoRAs merged (``stored_weight``, ``merge_patches``).
- ``comfy.ops.disable_weight_init``'s Linear and Embedding create no weight under the dynamic VRAM
  loader unless their class has its own state-dict loading: ``shape_ops`` subclasses them so that a
  model built on the meta device shows every tensor a file must hold (``check()`` says if not).
- ``BaseModel.manual_cast_dtype`` and ``CastWeightBiasOp.comfy_cast_weights``: how the NaN guard
  redoes a step in fp32. Without them the guard only reports. ``executor.class_obj``: the model an
  APPLY_MODEL wrapper wraps.
- ``ModelPatcher.partially_unload``: where ComfyUI asks a loaded model for memory. Our patcher
  class also frees the converted copies its layers hold where that is not enough (``patcher_class``).
- ``folder_paths.folder_names_and_paths``: the core model folders our .gguf keys share.
- ``comfy.text_encoders.llama.Llama2_`` and ``qwen_vl.Qwen2VLVisionTransformer``'s constructor
  arguments (the text encoder is built from them at the file's sizes, ``text_encoder``), and
  ``comfy.sd.VAE``'s ``vae_dtype`` / ``first_stage_model`` (the VAE's fp32 redo, ``vae``): no other
  way exists; ``check()`` warns that this package needs an update if they change.
- ``comfy.text_encoders.llama.BaseGenerate``: ComfyUI's text generation (its TextGenerate node) calls
  the transformer's ``logits(x)`` with the last hidden states and stops at ``config.stop_tokens``. Our
  text encoder overrides ``logits`` (the output head is quantized bytes, which ComfyUI's would read
  as floats) and sets the stop tokens; ``check()`` warns where generation would then fail.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Iterator

import torch

import comfy.memory_management
import comfy.model_patcher
import comfy.ops
import folder_paths

log = logging.getLogger(__name__)

_PATCH_ATTRS = ("weight_function", "weight_lowvram_function")
# The attributes of a BaseModel holding its layers' converted copies (loaders.quant.plan.DeviceCopies)
# and the function letting go of what the layers hold when ComfyUI asks the model for memory
# (ops.release_memory).
COPIES = "qwen_image_gguf_copies"
RELEASE = "qwen_image_gguf_release"


class _CastBytes:
    """``cast_bias_weight`` / ``uncast_bias_weight`` as a context (what CastBiasWeightContext is)."""

    def __init__(self, layer, input, **kwargs):
        self.layer = layer
        self.state = comfy.ops.cast_bias_weight(layer, input, **kwargs)

    def __enter__(self):
        return self.state[:2]

    def __exit__(self, *_args) -> None:
        comfy.ops.uncast_bias_weight(self.layer, *self.state)


class Features:
    """What ``check()`` found (all on until it says otherwise), and the cast context it chose."""
    cast = getattr(comfy.ops, "CastBiasWeightContext", _CastBytes)
    dynamic_marks = True
    low_rank_lora = True
    fp32_redo = True


def check() -> None:
    """Look at each internal once (at start-up) and log what changed. A check that cannot even look
    (ComfyUI moved what it reads) says so and takes the slower path instead of failing the load."""
    Features.dynamic_marks = Features.low_rank_lora = Features.fp32_redo = True
    for look in (_check_cast, _check_dynamic_marks, _check_lora, _check_merge_hooks, _check_fp32_redo,
                 _check_builders, _check_shape_ops):
        try:
            look()
        except Exception as e:  # noqa: BLE001  (any change of ComfyUI's: said, never fatal)
            log.warning("ComfyUI changed where %s looks (%s: %s); taking the slower path", look.__name__,
                        type(e).__name__, e)
            if look is _check_dynamic_marks:
                Features.dynamic_marks = False
            elif look is _check_lora:
                Features.low_rank_lora = False
            elif look is _check_fp32_redo:
                Features.fp32_redo = False


def _check_cast() -> None:
    Features.cast = getattr(comfy.ops, "CastBiasWeightContext", _CastBytes)
    if Features.cast is _CastBytes:
        log.warning("ComfyUI has no comfy.ops.CastBiasWeightContext: GGUF layers use cast_bias_weight directly")


def _check_dynamic_marks() -> None:
    cast = inspect.getsource(comfy.ops.cast_bias_weight)
    resolve = inspect.getsource(comfy.ops.resolve_cast_module_with_vbar)
    if '"_v"' not in cast or "_v_weight" not in resolve:
        Features.dynamic_marks = False
        log.warning("ComfyUI's cast no longer reads the dynamic loader's _v / _v_weight: GGUF layers take the cast "
                    "path on every call and keep nothing made of the bytes it brings (more host time)")


def _check_lora() -> None:
    from comfy.weight_adapter.lora import LoRAAdapter
    probe = comfy.model_patcher.LowVramPatch("k", {"k": []})
    Features.low_rank_lora = (hasattr(probe, "patches") and hasattr(probe, "key")
                              and "weights" in inspect.signature(LoRAAdapter.__init__).parameters)
    if not Features.low_rank_lora:
        log.warning("ComfyUI's LowVramPatch / LoRAAdapter changed: LoRAs on GGUF layers run through ComfyUI's own "
                    "patch function (a full-size weight difference per call)")


def _check_merge_hooks() -> None:
    import comfy.lora
    if not hasattr(comfy.model_patcher, "get_key_weight"):
        log.warning("ComfyUI's patcher no longer finds ops' convert_weight / set_weight (get_key_weight): a LoRA "
                    "merged into a GGUF model at a full load may be wrong; this package needs an update")
    if "intermediate_dtype" not in inspect.signature(comfy.lora.calculate_weight).parameters:
        log.warning("ComfyUI's comfy.lora.calculate_weight changed: saving a MODEL as GGUF will fail; this package "
                    "needs an update")


def _check_fp32_redo() -> None:
    if not hasattr(comfy.ops.CastWeightBiasOp, "comfy_cast_weights"):
        Features.fp32_redo = False
        log.warning("ComfyUI's ops have no comfy_cast_weights: the NaN guard reports a non-finite step without "
                    "redoing it in fp32")


def _check_builders() -> None:
    import comfy.sd
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_vl as qwen_vl
    wanted = {llama.Llama2_.__init__: {"config", "device", "dtype", "ops"},
              qwen_vl.Qwen2VLVisionTransformer.__init__: {
                  "hidden_size", "output_hidden_size", "intermediate_size", "num_heads", "num_layers",
                  "patch_size", "spatial_merge_size", "device", "dtype", "ops"}}
    for init, names in wanted.items():
        missing = names - set(inspect.signature(init).parameters)
        if missing:
            log.warning("ComfyUI's %s takes no %s any more: GGUF text encoders cannot be built; this package "
                        "needs an update", init.__qualname__, ", ".join(sorted(missing)))
    generate = getattr(llama, "BaseGenerate", None)
    if generate is None or "self.logits(" not in inspect.getsource(generate.generate) \
            or not issubclass(llama.Qwen25_7BVLI, generate):
        log.warning("ComfyUI's text generation (BaseGenerate) changed: text generation with GGUF text encoders "
                    "(the TextGenerate node) may fail; this package needs an update")
    source = inspect.getsource(comfy.sd.VAE.__init__)
    if "self.vae_dtype" not in source or "self.first_stage_model" not in source:
        log.warning("ComfyUI's VAE no longer holds vae_dtype / first_stage_model: the VAE's fp32 redo of a "
                    "non-finite decode will fail; this package needs an update")


def _check_shape_ops() -> None:
    saved = comfy.memory_management.aimdo_enabled
    comfy.memory_management.aimdo_enabled = True  # the case that matters, whatever this machine runs
    try:
        made = _ShapeOps.Linear(2, 2, device="meta").weight is not None
    finally:
        comfy.memory_management.aimdo_enabled = saved
    if not made:
        log.warning("ComfyUI's Linear no longer creates its weight for a class with its own loading: GGUF diffusion "
                    "models are checked for missing or misshaped tensors only in part; this package needs an update")


class _FreesCopiesToo:
    """A patcher mix-in: memory asked of the model that ComfyUI's own unloading (of the file's bytes,
    which the layers holding copies no longer read) does not cover comes from the layers' converted
    copies, which ComfyUI does not see (they come back, at first use, while memory allows)."""

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        freed = super().partially_unload(device_to, memory_to_free, force_patch_weights)
        release = getattr(self.model, RELEASE, None)
        if release is not None:
            freed += release(copies_too=freed < memory_to_free)
        return freed


@functools.lru_cache(maxsize=None)
def patcher_class(dynamic: bool) -> type:
    """ComfyUI's patcher class for a diffusion model (its dynamic VRAM one, or the classic one), with
    the copies freed when ComfyUI asks the model for more memory than its own unloading frees."""
    base = comfy.model_patcher.CoreModelPatcher if dynamic else comfy.model_patcher.ModelPatcher
    return type(f"GGUF{base.__name__}", (_FreesCopiesToo, base), {})


def managed(layer: torch.nn.Module) -> bool:
    """Whether ComfyUI's dynamic VRAM loader manages ``layer`` (its cast must bring the bytes in)."""
    # The instance dict directly: a missing attribute costs nn.Module.__getattr__ an exception.
    return not Features.dynamic_marks or "_v" in layer.__dict__


def resident(layer: torch.nn.Module, raw: torch.Tensor) -> bool:
    """Whether ``raw`` is the dynamic loader's resident copy of the layer's bytes (handed back while
    the bytes stay in place, a new tensor when it brings them in again)."""
    return raw is layer.__dict__.get("_v_weight")


def cast_bytes(layer: torch.nn.Module, input: torch.Tensor):
    """A context giving (bytes, bias): ComfyUI's cast of the layer's weight bytes (uint8, uncast) and
    bias (the input's dtype) to the input's device, through its offload streams and dynamic loader."""
    return Features.cast(layer, input, dtype=torch.uint8, bias_dtype=input.dtype, offloadable=True)


class hidden_patches:
    """A context in which the layer's weight patches are hidden from ComfyUI's cast (they expect float
    weights: the caller applies them after dequantizing)."""

    def __init__(self, layer: torch.nn.Module):
        self.state = layer.__dict__

    def __enter__(self) -> None:
        # The instance dict directly: nn.Module.__setattr__ costs microseconds per layer.
        state = self.state
        self.saved = {k: state[k] for k in _PATCH_ATTRS if k in state}
        state.update(weight_function=[], weight_lowvram_function=None)

    def __exit__(self, *_args) -> None:
        for k in _PATCH_ATTRS:
            self.state.pop(k, None)
        self.state.update(self.saved)


def lowvram_patch_entries(patch) -> tuple | None:
    """The (strength, adapter, strength_model, offset, function) entries of a ComfyUI per-layer patch,
    or None for any other patch function (or where ComfyUI changed them)."""
    if not Features.low_rank_lora or not isinstance(patch, comfy.model_patcher.LowVramPatch):
        return None
    return tuple(patch.patches[patch.key])


def lora_factors(adapter) -> tuple | None:
    """(up, down, alpha) of a plain LoRA adapter (no DoRA, LoCon mid weight or reshape), else None."""
    from comfy.weight_adapter.lora import LoRAAdapter
    if type(adapter) is not LoRAAdapter:
        return None
    try:
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
    except ValueError:  # ComfyUI changed what an adapter holds: its own patch function applies it
        return None
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    return up, down, alpha


def stored_weight(patcher, key: str) -> tuple[torch.Tensor, object]:
    """Tensor ``key`` of ``patcher``'s model as stored before any patch, with the op's
    ``convert_weight`` (None where it has none): where ComfyUI has merged patches into the shared
    model (a full load), the original is in the patcher's backup."""
    weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
    backup = patcher.backup.get(key)
    return (weight if backup is None else backup.weight), convert


def merge_patches(patcher, key: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (float32) with ``patcher``'s patches of ``key`` merged as ComfyUI merges a LoRA."""
    import comfy.lora
    patches = patcher.patches.get(key)
    return comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32) if patches else weight


def to_cpu_float(weight: torch.Tensor) -> torch.Tensor:
    """A copy of a weight in float32 on the CPU, through ComfyUI's cast (which dequantizes its own
    quantized tensors)."""
    import comfy.model_management
    return comfy.model_management.cast_to_device(weight, torch.device("cpu"), torch.float32, copy=True)


@contextlib.contextmanager
def computing_in_fp32(model) -> Iterator[None]:
    """``model`` (a ComfyUI BaseModel) run in fp32: inputs cast to fp32 and every layer casting its
    weights to them, whatever dtype it normally computes in."""
    layers = [m for m in model.modules() if isinstance(m, comfy.ops.CastWeightBiasOp)]
    saved = (model.manual_cast_dtype, [m.comfy_cast_weights for m in layers])
    model.manual_cast_dtype = torch.float32
    for m in layers:
        m.comfy_cast_weights = True
    try:
        yield
    finally:
        model.manual_cast_dtype = saved[0]
        for m, value in zip(layers, saved[1]):
            m.comfy_cast_weights = value


class _ShapeOps(comfy.ops.disable_weight_init):
    """ComfyUI's layers with every weight created where the model is built: under its dynamic VRAM
    loader its Linear and Embedding create theirs only when a state dict is loaded, unless the class
    brings its own loading (as these do, ComfyUI's unchanged)."""

    class Linear(comfy.ops.disable_weight_init.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            return super()._load_from_state_dict(*args, **kwargs)

    class Embedding(comfy.ops.disable_weight_init.Embedding):
        def _load_from_state_dict(self, *args, **kwargs):
            return super()._load_from_state_dict(*args, **kwargs)


def shape_ops() -> type:
    """Operations for a model built on the meta device to read its tensors' names and shapes."""
    return _ShapeOps


def wrapped_model(executor):
    """The BaseModel whose apply_model a ComfyUI wrapper ``executor`` runs."""
    return executor.class_obj


def core_folders(key: str) -> list[str]:
    """The folders of ComfyUI's model folder ``key`` (none, with a log line, if ComfyUI dropped it)."""
    entry = folder_paths.folder_names_and_paths.get(key)
    if entry is None:
        log.warning("ComfyUI has no model folder %r: its .gguf files are not listed", key)
        return []
    return entry[0]
