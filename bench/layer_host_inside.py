"""The part of layer_host.py that runs inside a started ComfyUI (see tests/comfy_runner.py)."""

import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfy.sd
import comfyui_version

# One block's Linear layers in the order the block runs them, and which input each reads: the
# attention's q, k and v projections read the same tensor, as in the model.
BLOCK_ORDER = [
    ("img_mod.1", "temb"), ("txt_mod.1", "temb"),
    ("attn.to_q", "img"), ("attn.to_k", "img"), ("attn.to_v", "img"),
    ("attn.add_q_proj", "txt"), ("attn.add_k_proj", "txt"), ("attn.add_v_proj", "txt"),
    ("attn.to_out.0", "img_attn"), ("attn.to_add_out", "txt_attn"),
    ("img_mlp.net.0.proj", "img2"), ("img_mlp.net.2", "img_hidden"),
    ("txt_mlp.net.0.proj", "txt2"), ("txt_mlp.net.2", "txt_hidden"),
]


def block_pass(block, rows):
    """A callable running the block's Linear layers once, on inputs made once (fresh inputs per input
    name, shared where the model shares them)."""
    layers = [(block.get_submodule(name), source) for name, source in BLOCK_ORDER]
    inputs = {}
    for layer, source in layers:
        if source not in inputs:
            n = 2 if source == "temb" else rows
            inputs[source] = torch.randn(n, layer.in_features, device="cuda", dtype=torch.bfloat16)

    def run():
        for layer, source in layers:
            layer(inputs[source])
    return run


def copies_run(block, managed) -> str:
    """How many of the block's layers run a converted copy (cached and fp8 modes), of those that could:
    a layer whose copy was refused, or (outside the dynamic loader, ``managed`` telling) made from a
    bias it no longer holds, runs its bytes instead, as the layer's forward decides."""
    plans = [(layer, getattr(layer, "plan", None)) for layer in (block.get_submodule(n) for n, _ in BLOCK_ORDER)]
    able = [(layer, plan) for layer, plan in plans if getattr(plan, "copies", None) is not None]
    if not able:
        return "-"
    used = sum(plan.copy is not None and (managed(layer) or plan.copy.made_from(layer.bias)) for layer, plan in able)
    return f"{used} of {len(able)}"


def per_call_us(run, calls, layer_count):
    """(host, wall) microseconds per layer call. Host: the time the host spends issuing a pass, the GPU
    idle at its start (synchronized after each pass, outside the timing), so no launch waits on a full
    queue. Wall: passes back to back, synchronized at the end: the host's time where it is the
    bottleneck, the GPU's where that is."""
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    host = 0.0
    for _ in range(calls):
        start = time.perf_counter()
        run()
        host += time.perf_counter() - start
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return host / calls / layer_count * 1e6, wall / calls / layer_count * 1e6


def profile_text(run, calls, lines=25):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def run(cfg):
    sys.path.insert(0, cfg["repo"] + "/bench")
    from qwen_step_inside import native_model, random_model
    pkg, native_sd = random_model(cfg)
    unet = pkg.nodes.integration.diffusion
    variants = {
        "native bf16": lambda: native_model(native_sd),
        "native bf16, classic loader": lambda: comfy.sd.load_diffusion_model_state_dict(dict(native_sd),
                                                                                        disable_dynamic=True),
        "ours, on the fly": lambda: unet.load_gguf_unet(cfg["gguf"], unet.ON_THE_FLY),
        "ours, fp8 compute": lambda: unet.load_gguf_unet(cfg["gguf"], unet.FP8_COMPUTE),
        "ours, fp8 on the fly": lambda: unet.load_gguf_unet(cfg["gguf"], unet.FP8_ON_THE_FLY),
        "ours, on the fly, classic loader": lambda: unet.load_gguf_unet(cfg["gguf"], unet.ON_THE_FLY, disable_dynamic=True),
        "ours, fp8 compute, classic loader": lambda: unet.load_gguf_unet(cfg["gguf"], unet.FP8_COMPUTE, disable_dynamic=True),
        "ours, cached": lambda: unet.load_gguf_unet(cfg["gguf"], unet.CACHED),
        "ours, cached, classic loader": lambda: unet.load_gguf_unet(cfg["gguf"], unet.CACHED, disable_dynamic=True),
    }
    # All models loaded at once (two blocks each) and timed in turns, round after round in alternating
    # order: the host's speed drifts by tens of percent over a run, and each model meets it alike.
    models, passes = {}, {}
    with torch.inference_mode():
        for name, make in variants.items():
            models[name] = make()
        mm.load_models_gpu(list(models.values()))
        for name, model in models.items():
            passes[name] = block_pass(model.model.diffusion_model.transformer_blocks[0], cfg["rows"])
            per_call_us(passes[name], cfg["calls"], len(BLOCK_ORDER))
        timings = {name: [] for name in models}
        for round_ in range(cfg["rounds"]):
            for name in list(models)[::(-1) ** round_]:
                timings[name].append(per_call_us(passes[name], cfg["calls"], len(BLOCK_ORDER)))
        rows = {name: statistics.median(host for host, _ in t) for name, t in timings.items()}
        walls = {name: statistics.median(wall for _, wall in t) for name, t in timings.items()}
        for name, t in timings.items():
            print("layer host time:", name, ", ".join(f"{h:.1f}" for h, _ in t), "us; wall:",
                  ", ".join(f"{w:.1f}" for _, w in t), "us", flush=True)
        profiles = {name: profile_text(run_block, max(20, cfg["calls"] // 10))
                    for name, run_block in passes.items()} if cfg["profile"] else {}
        managed = pkg.nodes.integration.compat.managed
        copies = {name: copies_run(model.model.diffusion_model.transformer_blocks[0], managed)
                  for name, model in models.items()}
    return {"rows": rows, "walls": walls, "profiles": profiles, "copies": copies, "layers_per_block": len(BLOCK_ORDER),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "dynamic_vram": comfy.memory_management.aimdo_enabled}
