"""Building ComfyUI's own model objects from a GGUF diffusion model read by ``loaders``."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models

from ...loaders.gguf.errors import GGUFError
from ...loaders.gguf.state_dict import check_tensors
from ...loaders.models.diffusion import DiffusionModel, open_diffusion_model
from ...loaders.quant import fp8
from ...loaders.quant.convert import nbytes, to_fp8
from ...loaders.quant.plan import DeviceCopies
from ...loaders.quant.weight import GGMLTensor, logical_shape
from .guard import GGUF_PATH
from . import compat
from .ops import FileWeights, attach_copies, copy_resident_layers, drop_device_state, file_ops, share_inputs

log = logging.getLogger(__name__)

# Our family name -> ComfyUI's model config class (latent format, sampling defaults, conditioning).
MODEL_CONFIGS = {
    "qwen_image": comfy.supported_models.QwenImage,
    "z_image": comfy.supported_models.ZImage,
}

# Per family: the config entry giving the width of the text features it takes, and the encoder
# giving them at the published models' size.
TEXT_FEATURES = {
    "qwen_image": ("joint_attention_dim", "Qwen2.5-VL-7B"),
    "z_image": ("cap_feat_dim", "Qwen3-4B"),
}
TEXT_WIDTH_KEY = "qwen_image_gguf_text_width"

# Qwen-Image overflows in fp16 (black images), so fp16 is never offered whatever the device supports.
COMPUTE_DTYPES = [torch.bfloat16, torch.float32]


# How the quantized weights are run (the loader's "mode" option).
ON_THE_FLY, CACHED, FP8_COMPUTE, FP8_ON_THE_FLY, AUTO = "on the fly", "cached", "fp8 compute", "fp8 on the fly", "auto"
MODES = [AUTO, ON_THE_FLY, CACHED, FP8_COMPUTE, FP8_ON_THE_FLY]
# The largest usual generation (1328x1328, a batch-2 CFG forward) sets the VRAM the cache leaves free.
RESERVE_LATENT = (2, 16, 1, 166, 166)
# Float tensors up to this size (biases, norms, pad tokens) are stored in the compute dtype at load.
SMALL_TENSOR = 1 << 20


def load_gguf_unet(path: str, mode: str = AUTO, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    patcher = build_model_patcher(open_diffusion_model(path), mode, disable_dynamic)
    # Lets ComfyUI rebuild a classic (non-dynamic) copy when a node asks for one (torch.compile does).
    patcher.cached_patcher_init = (load_gguf_unet, (path, mode))
    return patcher


def expected_tensors(dm: DiffusionModel) -> dict[str, tuple[int, ...]]:
    """The tensors ComfyUI's own model of this config holds (built on the meta device: no memory)."""
    model_config = MODEL_CONFIGS[dm.family](dict(dm.unet_config))
    model_config.set_inference_dtype(torch.bfloat16, None)
    model_config.custom_operations = compat.shape_ops()
    model = model_config.get_model({}, "", device=torch.device("meta"))
    # Zero-element entries are markers (Edit-2511's __index_timestep_zero__, which the config is read
    # from): the model holds one exactly where the file does.
    return {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}


def build_model_patcher(dm: DiffusionModel, mode: str = AUTO,
                        disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    # A removed or mis-shaped weight would otherwise load with ComfyUI's "unet missing" warning and
    # fail (or compute garbage) at the first step; tensors the model ignores are only logged.
    unexpected = check_tensors(dm.path, dm.state_dict, expected_tensors(dm),
                               f"{dm.variant} model of {dm.unet_config.get('num_layers', dm.unet_config.get('n_layers'))} "
                               "layers", unexpected_is_fault=False)
    if unexpected:
        log.warning("GGUF %s: tensors this model does not use, ignored: %s", dm.path, ", ".join(unexpected[:8]))
    model_config = MODEL_CONFIGS[dm.family](dict(dm.unet_config))
    params = sum(logical_shape(t).numel() for t in dm.state_dict.values())
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype = comfy.model_management.unet_dtype(load_device, model_params=params, supported_dtypes=COMPUTE_DTYPES)
    if mode in (FP8_COMPUTE, FP8_ON_THE_FLY) and not _fp8_matmuls(dm, mode, dtype, load_device):
        mode = ON_THE_FLY
    model_config.set_inference_dtype(dtype, None)
    model_config.custom_operations = file_ops(load_device, dtype, fp8_rows=mode == FP8_ON_THE_FLY)
    model = model_config.get_model(dm.state_dict, "", device=offload_device)
    setattr(model, GGUF_PATH, dm.path)
    state_dict, copies = _apply_mode(dm, model, mode, dtype, load_device)
    # ComfyUI's current patcher: with its dynamic VRAM loader on (NVIDIA, the default) the quantized
    # bytes live in its page cache and stream to the GPU as needed; otherwise the classic one.
    patcher = compat.patcher_class(dynamic=not disable_dynamic)(model, load_device=load_device,
                                                                 offload_device=offload_device)
    model.load_model_weights(state_dict, "", assign=patcher.is_dynamic())
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, on_detach)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, TEXT_WIDTH_KEY,
                                 text_width_check(dm))
    if copies is not None:
        attach_copies(model, copies)
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, on_load)
    share_inputs(model)
    log.info("GGUF %s: %s (%s naming), %d layers, computing in %s; weights %s",
             dm.path, dm.variant, dm.naming, dm.unet_config.get("num_layers", dm.unet_config.get("n_layers")),
             dtype, dm.summary)
    return patcher


def text_width_check(dm: DiffusionModel) -> Callable[..., Any]:
    """A wrapper of the model's forward refusing text features of another width than the model's:
    those of another encoder (Qwen2.5-VL-3B's 2048 for Qwen-Image's 3584) would otherwise fail deep
    in the first block with a shape error naming neither file. (It keeps only what it says: holding
    ``dm`` would keep the file's state dict alive as long as the model.)"""
    key, encoder = TEXT_FEATURES[dm.family]
    width, path, variant = dm.unet_config[key], dm.path, dm.variant

    def check(executor, x, timestep, context, *args, **kwargs):
        if context is not None and context.shape[-1] != width:
            raise GGUFError(path, f"the prompt's conditioning is {context.shape[-1]} wide, but this {variant} "
                                  f"model takes {width}-wide text features: encode the prompt with its own text "
                                  f"encoder ({encoder}; another model or size of it gives other widths)")
        return executor(x, timestep, context, *args, **kwargs)
    return check


def on_detach(patcher: comfy.model_patcher.ModelPatcher, unpatch_all: bool = True, *args) -> None:
    """ComfyUI ON_DETACH callback: what our layers hold on the GPU for the loaded model goes with it
    (not where a clone only hands the loaded model over to another, unpatch_all False)."""
    if unpatch_all:
        drop_device_state(patcher.model)


def on_load(patcher: comfy.model_patcher.ModelPatcher, *args) -> None:
    """ComfyUI ON_LOAD callback: the layers its loader put on the device make their copies now."""
    copy_resident_layers(patcher.model)


def _apply_mode(dm: DiffusionModel, model, mode: str, dtype: torch.dtype,
                device: torch.device) -> tuple[dict, DeviceCopies | None]:
    """The state dict to load, and the DeviceCopies its layers' plans share (cached and fp8 modes).

    The small float tensors (biases, norms: F32 in every GGUF) are stored in the compute dtype, as
    ComfyUI stores a native model's, instead of being cast on every forward (large float weights stay
    views of the file). The cached mode keeps dequantized copies of the weights on the device while
    they fit (and runs the rest on the fly); the fp8 mode keeps FP8-rows copies where all of them fit
    next to the bytes, and otherwise requantizes the file's weights here, at load, so that ComfyUI
    holds and pages FP8 rows instead of the GGUF blocks."""
    if mode not in MODES:
        raise GGUFError(dm.path, f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    state_dict = {k: v.to(dtype) if type(v) is torch.Tensor and v.is_floating_point() and v.numel() <= SMALL_TENSOR
                  else v for k, v in dm.state_dict.items()}
    on_gpu = not comfy.model_management.is_device_cpu(device)
    if mode == FP8_ON_THE_FLY:
        log.info("GGUF %s: mode %s: weights stay quantized, each layer decoded to fp8 rows when it runs and "
                 "multiplied with fp8 matmuls", dm.path, mode)
        return state_dict, None
    if mode == ON_THE_FLY or (mode == AUTO and not on_gpu):
        log.info("GGUF %s: mode %s: weights stay quantized, dequantized layer by layer when it runs", dm.path,
                 "auto (on the fly on the CPU)" if mode == AUTO else mode)
        return state_dict, None
    free = comfy.model_management.get_free_memory(device)
    reserve = model.memory_required(RESERVE_LATENT) + comfy.model_management.minimum_inference_memory()
    copies = DeviceCopies(fp8=mode == FP8_COMPUTE, dtype=dtype, device=device, reserve=int(reserve),
                          free_memory=comfy.model_management.get_free_memory)
    stored = sum(nbytes(t) for t in state_dict.values())
    converted = sum(logical_shape(t).numel() * (1 if copies.fp8 else dtype.itemsize)
                    for t in state_dict.values() if isinstance(t, GGMLTensor))
    fits = free - reserve >= stored + converted
    log.info("GGUF %s: mode %s: %s; %.1f GiB free on %s at load, %.1f GiB kept for sampling, the file's weights "
             "%.1f GiB, converted %.1f GiB", dm.path, mode,
             "converted layer by layer on the device at first use" if fits or not copies.fp8 else
             "requantized to fp8 rows now (the copies would not fit next to the file's weights)",
             free / 2**30, device, reserve / 2**30, stored / 2**30, converted / 2**30)
    if fits or not copies.fp8:
        return state_dict, copies
    return _requantize_fp8(dm, model, state_dict, device), None


def _fp8_matmuls(dm: DiffusionModel, mode: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` runs the fp8 modes (fp8 tensor cores, bf16 compute, Triton); if not, said."""
    if dtype == torch.bfloat16 and fp8.fast_path(torch.device(device)) is not None:
        return True
    log.warning("GGUF %s: mode %s needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                "Blackwell) computing in bf16 and Triton; %s computes in %s: running on the fly instead",
                dm.path, mode, device, dtype)
    return False


def _requantize_fp8(dm: DiffusionModel, model, state_dict: dict, device: torch.device) -> dict:
    """The state dict with every Linear weight that is quantized or large requantized to FP8 rows, on
    the GPU (where fp8 matmuls run), for ComfyUI to hold and page instead of the file's blocks."""
    linears = {name for name, m in model.diffusion_model.named_modules()
               if isinstance(m, FileWeights) and isinstance(m, torch.nn.Linear)}
    keys = [k for k, t in state_dict.items()
            if k.endswith(".weight") and k[:-len(".weight")] in linears and fp8.can_hold(logical_shape(t))
            and (isinstance(t, GGMLTensor) or t.numel() > SMALL_TENSOR)]
    start = time.perf_counter()
    converted = to_fp8(state_dict, keys, device)
    log.info("GGUF %s: mode fp8 compute: %d weights requantized to fp8 e4m3 with per-row scales in %.1f s",
             dm.path, len(keys), time.perf_counter() - start)
    return converted
