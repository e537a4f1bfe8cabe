"""The part of qwen_step.py that runs inside a started ComfyUI (see tests/comfy_runner.py)."""

import statistics
import subprocess
import sys
import threading
import time

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfyui_version
from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow


class PeakVRAM:
    """Highest GPU memory in use (nvidia-smi, every 0.1 s) while the block runs."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while self.running:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True).stdout.split()
            except FileNotFoundError:  # no NVIDIA driver: nothing to read
                return
            if out:
                self.peak = max(self.peak, int(out[0]))
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def random_weights(cfg, pkg):
    sys.path.insert(0, cfg["repo"])
    sys.path.insert(0, cfg["repo"] + "/tests")
    sys.path.insert(0, cfg["repo"] + "/bench")
    from tiny_models import qwen_image_shapes
    from dequant_bandwidth import random_blocks
    from gguf import GGMLQuantizationType as T
    from loaders.writer import city96_recipe
    recipe = city96_recipe(T.Q4_K, cfg["layers"])
    GGMLTensor = pkg.loaders.tensor.GGMLTensor
    shapes = qwen_image_shapes(layers=cfg["layers"], heads=24, head_dim=128, text_dim=3584, mlp=12288,
                               in_channels=64, out_channels=16)
    ours, native = {}, {}
    device = cfg.get("device", "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        qtype = recipe(name, shape)
        if qtype == T.F32:
            w = (torch.randn(shape, device=device, generator=g) * (0.02 if len(shape) > 1 else 1.0)).float()
            ours[name], native[name] = w.cpu(), w.to(torch.bfloat16).cpu()
            continue
        qcls = pkg.loaders.quants.DEQUANTIZERS[qtype]
        blocks = random_blocks(qtype, shape[0] * shape[1] // qcls.block_size, device)
        t = GGMLTensor(blocks, qtype, shape)
        native[name] = pkg.loaders.tensor.dequantize(t, torch.bfloat16).cpu()
        ours[name] = GGMLTensor(blocks.cpu(), qtype, shape)
    return ours, native


def native_model(sd, layers):
    config = comfy.supported_models.QwenImage({"image_model": "qwen_image", "in_channels": 64, "num_layers": layers})
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model(sd, "")
    patcher = comfy.model_patcher.CoreModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    model.load_model_weights(sd, "", assign=patcher.is_dynamic())
    return patcher


def seconds_per_step(model, size, steps):
    model = ModelSamplingAuraFlow().patch_aura(model, 3.1)[0]
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 96, 3584, generator=g), {}]]
    uncond = [[torch.randn(1, 96, 3584, generator=g), {}]]  # same length: one batch-2 forward per step
    latent = torch.zeros(1, 16, 1, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    stamps = []

    def callback(step, x0, x, total):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    comfy.sample.sample(model, noise, 2, 4.0, "dpmpp_2m", "karras", cond, uncond, latent, callback=callback,
                        disable_pbar=True, seed=0)  # warm-up: load, compile, allocate
    stamps.clear()
    with PeakVRAM() as peak:
        callback(0, None, None, steps)
        stamps.clear()
        stamps.append(time.perf_counter())
        out = comfy.sample.sample(model, noise, steps, 4.0, "dpmpp_2m", "karras", cond, uncond, latent,
                                  callback=callback, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), peak.peak / 1024


def run(cfg):
    sys.path.insert(0, cfg["repo"] + "/tests/comfy_scripts")
    from script_helpers import loaded_module
    pkg = loaded_module(cfg, cfg["package"])
    ours_sd, native_sd = random_weights(cfg, pkg)
    rows = []
    dm = pkg.loaders.diffusion.DiffusionModel("random-full-size.gguf", "qwen_image", "Qwen-Image",
                                              pkg.loaders.diffusion.qwen_image_config(ours_sd, "random")[0],
                                              ours_sd, "ComfyUI")
    for name, build in (("native bf16", lambda: native_model(native_sd, cfg["layers"])),
                        ("GGUF Q4_K_M (ours, on the fly)", lambda: pkg.nodes.model.build_model_patcher(dm))):
        model = build()
        for size in cfg["sizes"]:
            s, peak = seconds_per_step(model, size, cfg["steps"])
            rows.append({"model": name, "size": size, "s_per_step": s, "peak_vram_gb": peak})
            print("step timing:", rows[-1], flush=True)
        mm.unload_all_models()
        del model
        mm.soft_empty_cache()
    return {"rows": rows, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "dynamic_vram": comfy.memory_management.aimdo_enabled}
