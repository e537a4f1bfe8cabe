"""The part of qwen_step.py that runs inside a started ComfyUI (see tests/comfy_runner.py)."""

import gc
import statistics
import sys
import threading
import time

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfy.sample
import comfy.sd
import comfyui_version
from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow


class PeakVRAM:
    """Highest GPU memory in use by all processes (cudaMemGetInfo, every 50 ms) while the block runs;
    read in-process, since the dynamic loader keeps weights outside torch's own counters."""

    def __enter__(self):
        self.peak, self.running = 0, torch.cuda.is_available()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while self.running:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def gpu_in_use_gb() -> float:
    """GPU memory in use by all processes now (GiB): what a variant starts from (what earlier ones left)."""
    if not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def reserved_gb() -> float:
    """What torch's caching allocator holds now (GiB), in use or not: part of the whole GPU's figure."""
    return torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0


def random_weights(cfg, pkg):
    """Our weights (quantized blocks, the Q4_K_M mix) and the same values in bf16 for the native models."""
    sys.path.insert(0, cfg["repo"])
    sys.path.insert(0, cfg["repo"] + "/tests")
    sys.path.insert(0, cfg["repo"] + "/bench")
    from tiny_models import qwen_image_shapes
    from dequant_bandwidth import random_blocks
    from loaders.convert.recipes import IMAGE_ARCHS, LEVELS, image_recipe
    from loaders.quant.formats import FLOAT_TYPES
    recipe = image_recipe(LEVELS["Q4_K_M"], IMAGE_ARCHS["qwen_image"], cfg["layers"])
    GGMLTensor = pkg.loaders.quant.weight.GGMLTensor
    shapes = qwen_image_shapes(layers=cfg["layers"], heads=24, head_dim=128, text_dim=3584, mlp=12288,
                               in_channels=64, out_channels=16)
    ours, native = {}, {}
    device = cfg.get("device", "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        qtype = recipe(name, shape)
        if qtype in FLOAT_TYPES:  # the recipe's unquantized tensors, held in the file's float type
            w = (torch.randn(shape, device=device, generator=g) * (0.02 if len(shape) > 1 else 1.0)).float()
            ours[name], native[name] = w.to(FLOAT_TYPES[qtype]).cpu(), w.to(torch.bfloat16).cpu()
            continue
        qcls = pkg.loaders.quant.formats.FORMATS[qtype]
        blocks = random_blocks(qtype, shape[0] * shape[1] // qcls.block_size, device)
        t = GGMLTensor(blocks, qtype, shape)
        native[name] = pkg.loaders.quant.weight.dequantize(t, torch.bfloat16).cpu()
        ours[name] = GGMLTensor(blocks.cpu(), qtype, shape)
    return ours, native


def random_model(cfg):
    """(this package as ComfyUI loaded it, the native bf16 weights): a random model of cfg's size in
    the Q4_K_M mix, written to cfg["gguf"] as GGUF."""
    sys.path.insert(0, cfg["repo"] + "/tests/comfy_scripts")
    from script_helpers import loaded_module
    pkg = loaded_module(cfg, cfg["package"])
    ours_sd, native_sd = random_weights(cfg, pkg)
    write_gguf(cfg["gguf"], ours_sd)
    return pkg, native_sd


def write_gguf(path, weights):
    """The quantized weights as a GGUF file (city96 layout: ComfyUI names, architecture qwen_image)."""
    from loaders.gguf.writer import encode, write_encoded
    from loaders.quant.formats import FLOAT_TYPES
    encoded = {}
    float_types = {dtype: qtype for qtype, dtype in FLOAT_TYPES.items()}
    for name, t in weights.items():
        if type(t) is torch.Tensor:
            encoded[name] = (encode(t.float().numpy(), float_types[t.dtype]), float_types[t.dtype])
        else:
            with torch._C.DisableTorchFunctionSubclass():
                encoded[name] = (t.numpy(), t.fmt.qtype)
    write_encoded(path, encoded, "qwen_image")


def sample(model, size, steps, callback=None):
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 96, 3584, generator=g), {}]]
    uncond = [[torch.randn(1, 96, 3584, generator=g), {}]]  # same length: one batch-2 forward per step
    latent = torch.zeros(1, 16, 1, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 4.0, "dpmpp_2m", "karras", cond, uncond, latent,
                               callback=callback, disable_pbar=True, seed=0)


def seconds_per_step(models, size, steps, rounds=3):
    """Per model: median seconds per step over the last ``rounds`` - 1 of ``rounds`` runs (the models
    taking turns in alternating order, so that variants sharing weights meet the same conditions; the
    first round lets the dynamic loader settle, which takes more than the warm-up run; a run's first
    step, which includes switching models, is left out), each timed round's own median, the first
    step's seconds of the warm-up run (the dynamic loader faults the weights in), the peak VRAM (GiB)
    and the final latent of the last run."""
    stamps, intervals, first, peaks, finals = [], {n: [] for n in models}, {}, {}, {}
    per_round = {n: [] for n in models}

    def callback(step, x0, x, total):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    for name, model in models.items():
        stamps.clear()
        start = time.perf_counter()
        sample(model, size, 3, callback)
        first[name] = stamps[0] - start
    for round_ in range(rounds):
        for name, model in list(models.items())[::(-1) ** round_]:
            stamps.clear()
            with PeakVRAM() as peak:
                stamps.append(time.perf_counter())
                out = sample(model, size, steps, callback)
            assert torch.isfinite(out).all()
            if round_ > 0:
                steps_s = [b - a for a, b in zip(stamps[1:], stamps[2:])]
                intervals[name] += steps_s
                per_round[name].append(statistics.median(steps_s))
            peaks[name] = max(peaks.get(name, 0), peak.peak / 2**30)
            finals[name] = out.float().cpu()
    return {n: (statistics.median(intervals[n]), per_round[n], first[n], peaks[n], finals[n]) for n in models}


def host_profile(model, size, lines=30):
    """Where the host's time goes in two steps (cProfile, by own time), and how busy the GPU was over
    two more (kernel time against wall time: well below 100% means the run waits on the host)."""
    import cProfile
    import io
    import pstats
    from torch.profiler import ProfilerActivity, profile
    prof = cProfile.Profile()
    prof.enable()
    sample(model, size, 2)
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(lines)
    with profile(activities=[ProfilerActivity.CUDA]) as kernels:
        start = time.perf_counter()
        sample(model, size, 2)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    busy = sum(e.self_device_time_total for e in kernels.key_averages()) / 1e6
    top = sorted(kernels.key_averages(), key=lambda e: -e.self_device_time_total)[:12]
    text.write(f"GPU kernels {busy:.3f} s of {wall:.3f} s wall ({100 * busy / wall:.0f}% busy) over 2 steps; top:\n")
    text.writelines(f"  {e.self_device_time_total / 1e3:9.1f} ms {e.count:6d}x {e.key[:100]}\n" for e in top)
    return text.getvalue()


def native_model(sd, dtype=None, fast=False):
    """ComfyUI's own loading of the bf16 weights, as its UNETLoader does (weight_dtype default / fp8)."""
    options = {} if dtype is None else {"dtype": dtype}
    if fast:
        options["fp8_optimizations"] = True
    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options)


def run(cfg):
    sys.path.insert(0, cfg["repo"] + "/tests/comfy_scripts")
    from script_helpers import loaded_module
    pkg = loaded_module(cfg, cfg["package"])
    gguf_path = cfg["gguf"]
    weights = {}
    if not cfg.get("reuse_gguf"):
        ours_sd, weights["native"] = random_weights(cfg, pkg)
        write_gguf(gguf_path, ours_sd)
        del ours_sd
    unet = pkg.nodes.integration.diffusion
    guard = pkg.nodes.integration.guard
    def ours(mode, classic=False):
        name = f"ours, {mode}" + (", classic loader" if classic else "")
        return lambda: {name: unet.load_gguf_unet(gguf_path, mode, disable_dynamic=classic)}

    def with_guard():
        model = unet.load_gguf_unet(gguf_path, unet.ON_THE_FLY)
        return {"ours, on the fly": model, "ours, on the fly + NaN guard": guard.add_guard(model)}

    variants = {
        "ours, fp8 compute": ours(unet.FP8_COMPUTE),
        "ours, fp8 compute, classic loader": ours(unet.FP8_COMPUTE, classic=True),
        "ours, fp8 on the fly": ours(unet.FP8_ON_THE_FLY),
        "ours, on the fly, classic loader": ours(unet.ON_THE_FLY, classic=True),
        "native bf16": lambda: {"native bf16": native_model(weights["native"])},
        "native fp8_e4m3fn": lambda: {"native fp8_e4m3fn": native_model(weights["native"], torch.float8_e4m3fn)},
        "native fp8_e4m3fn_fast": lambda: {"native fp8_e4m3fn_fast": native_model(weights["native"],
                                                                                  torch.float8_e4m3fn, fast=True)},
        "ours, on the fly": ours(unet.ON_THE_FLY),
        "ours, on the fly + NaN guard": with_guard,
        "ours, cached": ours(unet.CACHED),
        "ours, auto": ours(unet.AUTO),
    }
    rows, profiles, finals = [], {}, {}
    for i, name in enumerate(cfg["variants"]):
        if not any(m.startswith("native") for m in cfg["variants"][i:]):
            weights.clear()  # the bf16 copy in RAM is no longer needed
        mm.unload_all_models()
        gc.collect()  # the last variant's patchers, so that its VRAM is free again
        mm.soft_empty_cache()
        before_load = gpu_in_use_gb()
        start = time.perf_counter()
        models = {n: ModelSamplingAuraFlow().patch_aura(m, 3.1)[0] for n, m in variants[name]().items()}
        mm.load_models_gpu(list(models.values())[:1])
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        load_s = time.perf_counter() - start
        rounds = cfg["guard_rounds"] if name == "ours, on the fly + NaN guard" else 3
        for size in cfg["sizes"]:
            for n, (s, per_round, first, peak, final) in seconds_per_step(models, size, cfg["steps"], rounds).items():
                finals[n, size] = final
                reference = finals.get(("native bf16", size))
                error = None if reference is None else float((final - reference).norm() / reference.norm())
                rows.append({"model": n, "size": size, "s_per_step": s, "round_medians": per_round,
                             "first_step_s": first, "load_s": load_s, "peak_vram_gb": peak,
                             "latent_rel_error": error, "vram_before_load_gb": before_load,
                             "torch_reserved_gb": reserved_gb()})
                print("step timing:", rows[-1], flush=True)
        if cfg.get("profile"):
            profiles[name] = host_profile(next(iter(models.values())), cfg["sizes"][0])
        del models
    return {"rows": rows, "profiles": profiles,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "dynamic_vram": comfy.memory_management.aimdo_enabled}
