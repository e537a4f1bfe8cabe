"""The part of load_time.py that runs inside a started ComfyUI (see tests/comfy_runner.py)."""

import gc
import sys
import time

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfyui_version


def timed_steps(patcher, size):
    """Seconds of the first step (the model brought to the GPU first) and of the second, and the peak
    VRAM of the whole GPU during both."""
    from qwen_step_inside import PeakVRAM
    g = torch.Generator(device="cuda").manual_seed(0)
    side = size // 8
    x = torch.randn(2, 16, 1, side, side, device="cuda", generator=g)
    context = torch.randn(2, 64, 3584, device="cuda", generator=g)
    sigma = torch.tensor([0.9, 0.9], device="cuda")
    times = []
    with PeakVRAM() as peak, torch.inference_mode():
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            mm.load_models_gpu([patcher])
            out = patcher.model.apply_model(x, sigma, c_crossattn=context)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    assert torch.isfinite(out).all()
    return times, peak.peak


def run(cfg):
    sys.path.insert(0, cfg["repo"] + "/bench")
    from qwen_step_inside import native_model, random_model
    pkg, native_sd = random_model(cfg)
    unet = pkg.nodes.integration.diffusion
    with open(cfg["gguf"], "rb") as f:  # the page cache warm, as for a file used before
        while f.read(1 << 26):
            pass
    variants = {"native bf16": lambda: native_model(native_sd)}
    variants.update({f"ours, {mode}": (lambda mode=mode: unet.load_gguf_unet(cfg["gguf"], mode)) for mode in cfg["modes"]})
    rows = {}
    for name, load in variants.items():
        start = time.perf_counter()
        patcher = load()
        loaded = time.perf_counter() - start
        (first, second), peak = timed_steps(patcher, cfg["size"])
        rows[name] = {"load": loaded, "first": first, "second": second, "peak": peak}
        print("load time:", name, rows[name], flush=True)
        mm.unload_all_models()
        del patcher
        gc.collect()
        mm.soft_empty_cache()
    return {"rows": rows, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "dynamic_vram": comfy.memory_management.aimdo_enabled}
