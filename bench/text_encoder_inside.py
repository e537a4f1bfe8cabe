"""The part of text_encoder.py that runs inside a started ComfyUI (see tests/comfy_runner.py)."""

import gc
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.sd

REFERENCE = "reference: ComfyUI's encoder, fp32 on the CPU"
PROMPT = ("A cozy bookshop cafe on a rainy evening, warm light spilling from the window onto wet cobblestones. "
          "A chalkboard sign by the door reads \"Qwen-Image GGUF - Open Late\" in neat handwriting. Inside, shelves "
          "of old books, a ginger cat asleep on a stack of novels, steam rising from a cup of coffee. "
          "Photorealistic, 35mm, shallow depth of field.")


def random_weights(cfg, pkg):
    """Qwen2.5-VL-7B's language model at full size: our GGUF tensors (llama.cpp's Q4_K_M mix, llama.cpp
    names), the same values in bf16 under Hugging Face names (what ComfyUI's own loader reads), and
    exactly (fp32) for the reference."""
    for sub in ("", "/tests", "/bench"):
        sys.path.insert(0, cfg["repo"] + sub)
    from dequant_bandwidth import random_blocks
    from gguf import GGMLQuantizationType as T
    from tiny_text_encoders import llm_shapes, q4_k_m, to_gguf_llm
    spec = cfg["spec"]
    shapes = llm_shapes(**spec, head=True)  # with its untied output head, as the real file has
    pick = q4_k_m(spec, tied=False)
    device = cfg["device"]
    # Seeded: the global generator's state depends on what ComfyUI drew at start-up, so each loader's
    # run would otherwise build another model.
    g = torch.Generator(device=device).manual_seed(cfg.get("seed", 0))
    ours, native, exact = {}, {}, {}
    for gguf_name, hf_name in to_gguf_llm({k: k for k in shapes}).items():
        shape = shapes[hf_name]
        qtype = pick(gguf_name, shape)
        if qtype == T.F32:
            w = torch.randn(shape, device=device, generator=g) * 0.02 + (1.0 if "norm" in hf_name else 0.0)
            ours[gguf_name], native[hf_name] = (w.float().cpu().numpy(), T.F32), w.to(torch.bfloat16).cpu()
            exact[hf_name] = w.float().cpu()
            continue
        qcls = pkg.loaders.quant.formats.FORMATS[qtype]
        blocks = well_conditioned(qtype, random_blocks(qtype, shape[0] * shape[1] // qcls.block_size, device,
                                                       generator=g), shape, pkg)
        t = pkg.loaders.quant.weight.GGMLTensor(blocks, qtype, shape)
        exact[hf_name] = pkg.loaders.quant.weight.dequantize(t, torch.float32).cpu()
        native[hf_name] = exact[hf_name].to(torch.bfloat16)
        ours[gguf_name] = (blocks.reshape(shape[0], -1).cpu().numpy(), qtype)  # one row of blocks per weight row
    return ours, native, exact


# Random block bytes make badly conditioned weights: with dmin = d a K-quant with a minimum
# (value = d * scale * q - dmin * min, q uniform over 0..15 for Q4_K, 0..31 for Q5_K) leans positive
# (a mean of about 200 d), and Q6_K's int8 scales give it five times Q4_K's spread. 28 such layers are
# chaotic: bf16 rounding alone then moves the output by 20-40% (seen on an H100, for ComfyUI's own
# encoder and ours alike, while ours in fp32 matched the fp32 reference to 1e-6). So the weights are
# centred (dmin = mean(q) * d) and scaled to unit gain (std 1/sqrt(fan-in)), as trained weights are.
_Q_MEAN = {"Q4_K": 7.5, "Q5_K": 15.5}


def well_conditioned(qtype, blocks, shape, pkg):
    from dequant_bandwidth import F16_FIELDS
    mean = _Q_MEAN.get(qtype.name)
    if mean is not None:
        d = blocks[:, 0:2].contiguous().view(torch.float16)
        blocks[:, 2:4] = (d.float() * mean).to(torch.float16).view(torch.uint8).reshape(-1, 2)
    std = pkg.loaders.quant.weight.dequantize(pkg.loaders.quant.weight.GGMLTensor(blocks, qtype, shape), torch.float32).std()
    gain = (shape[1] ** -0.5 / std).item()
    for off in F16_FIELDS[qtype]:
        field = blocks[:, off:off + 2].contiguous().view(torch.float16)
        blocks[:, off:off + 2] = (field.float() * gain).to(torch.float16).view(torch.uint8).reshape(-1, 2)
    return blocks


def write_gguf(path, weights, spec, tokenizer_folder):
    from loaders.models.tokenizer import gguf_tokenizer_metadata
    from loaders.gguf.writer import write_encoded
    meta = {"qwen2vl.block_count": spec["layers"], "qwen2vl.embedding_length": spec["hidden"],
            "qwen2vl.feed_forward_length": spec["intermediate"], "qwen2vl.attention.head_count": spec["heads"],
            "qwen2vl.attention.head_count_kv": spec["kv_heads"], "qwen2vl.rope.freq_base": 1000000.0,
            "qwen2vl.attention.layer_norm_rms_epsilon": 1e-6, "qwen2vl.context_length": 128000,
            "qwen2vl.rope.dimension_sections": [16, 24, 24, 0],
            **gguf_tokenizer_metadata(tokenizer_folder, spec["vocab"])}
    write_encoded(path, weights, "qwen2vl", meta)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def layer_outputs(clip) -> list[torch.Tensor]:
    """Each decoder layer's output in one more encode (hooks copying to the CPU, so after the timed
    runs): where two encoders part, layer by layer."""
    layers = next(m for name, m in clip.cond_stage_model.named_modules() if name.endswith("model.layers"))
    outputs = [None] * len(layers)

    def keep(i):
        def hook(module, args, output):
            # A copy: on the CPU .float().cpu() would return the residual stream itself, which the
            # next layers change in place.
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach().to("cpu", torch.float32,
                                                                                          copy=True)
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def byte_checks(pkg):
    """After our encodes, per quantized layer: are the bytes the dynamic loader holds on the GPU the
    file's, and does the Triton kernel give the torch dequantizers' fp32 values on them (the text
    encoder computes in fp32, which nothing else runs at full size)? Names the layers that fail.
    (The loader's view counts as held while nothing was evicted: the encoder is small next to the
    GPUs this runs on.)"""
    kernels = importlib.import_module(pkg.__name__ + ".loaders.quant.kernels.dequant") if pkg.loaders.compat.triton_kernels() else None

    def check(clip):
        resident, wrong_bytes, wrong_values = 0, [], []
        for name, m in clip.cond_stage_model.named_modules():
            if not isinstance(m, pkg.nodes.integration.ops.FileWeights) or not m.quantized():
                continue
            file_bytes = m.stored().to("cuda")
            held = m.__dict__.get("_v_weight")
            if held is not None:
                resident += 1
                if not torch.equal(held.reshape(-1), file_bytes.reshape(-1)):
                    wrong_bytes.append(name)
            qcls, shape = m.plan.fmt, m.plan.shape
            if qcls.tile is not None:
                got = kernels.dequantize_cuda(file_bytes.contiguous(), qcls, shape, torch.float32)
                with torch._C.DisableTorchFunctionSubclass():
                    want = qcls.dequantize_blocks(file_bytes.reshape(-1, qcls.type_size)).reshape(shape)
                if not torch.equal(got, want.float()):
                    wrong_values.append(name)
        return {"resident_layers": resident, "wrong_bytes": wrong_bytes, "wrong_values": wrong_values}
    return check if kernels is not None else None


def generation_speed(clip, count: int) -> float:
    """Tokens per second of greedy generation through ComfyUI's own path (what its TextGenerate node
    runs), ``count`` tokens after the presets' prompt. No stop tokens, so every model makes them all
    (ComfyUI's own Qwen2.5-VL config has none at all, which otherwise stops its generation with an
    error; its output head is its token table, the same size as the file's own)."""
    clip.cond_stage_model.qwen25_7b.transformer.model.config.stop_tokens = []
    tokens = clip.tokenize(PROMPT)
    clip.generate(tokens, do_sample=False, max_length=4)  # compiles and brings the weights in
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids = clip.generate(tokens, do_sample=False, max_length=count)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(ids) / (time.perf_counter() - start)


def whole_gpu_in_use() -> int:
    """Bytes of GPU memory in use by all processes now (0 without a GPU)."""
    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def measure(build, runs, inspect=None, generate=0, profile=False):
    """Load seconds, first encode (weights brought to the GPU), median encode seconds, peak VRAM (GiB),
    how far the runs' conditionings stray from the first (a race would make them differ), what
    ``inspect(clip)`` finds after them, the last run's conditioning and each layer's output of one
    more encode."""
    from qwen_step_inside import PeakVRAM
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    with PeakVRAM() as peak:
        start = time.perf_counter()
        clip = build()
        load_s = time.perf_counter() - start
        times, conds = [], []
        for _ in range(runs + 1):
            start = time.perf_counter()
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            conds.append(cond[0][0].float().cpu())
    tokens = cond[0][0].shape[1]
    finite = bool(torch.isfinite(cond[0][0]).all())
    row = {"load_s": load_s, "first_encode_s": times[0], "encode_s": statistics.median(times[1:]),
           "peak_vram_gb": peak.peak / 2**30, "tokens": tokens, "finite": finite,
           "runs_vs_first": max(rel(c, conds[0]) for c in conds)}
    if inspect is not None:
        row["checks"] = inspect(clip)
        # The checks dequantize every tensor: torch's cache would hold those temporaries (gigabytes)
        # through the generation measured next.
        gc.collect()
        mm.soft_empty_cache()
    if generate:
        in_use = whole_gpu_in_use()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with PeakVRAM() as peak:
            row["generate_tok_s"] = generation_speed(clip, generate)
        row["generate_peak_vram_gb"] = peak.peak / 2**30
        # Where a generation peak comes from: what the GPU held as it began, and torch's own peaks of
        # memory allocated and held in its cache during it (the rest is outside torch: the dynamic
        # loader's weights, CUDA's context).
        row["generate_vram_before_gb"] = in_use / 2**30
        if torch.cuda.is_available():
            stats = torch.cuda.memory_stats()
            row["generate_torch_allocated_peak_gb"] = stats["allocated_bytes.all.peak"] / 2**30
            row["generate_torch_reserved_peak_gb"] = stats["reserved_bytes.all.peak"] / 2**30
        if profile:  # where the host time of a generated token goes (16 tokens, after the measurements)
            from layer_host_inside import profile_text
            tokens = clip.tokenize(PROMPT)
            row["generate_profile"] = profile_text(lambda: clip.generate(tokens, do_sample=False, max_length=16), 1)
    return row, conds[-1], layer_outputs(clip)


def run(cfg):
    sys.path.insert(0, cfg["repo"] + "/tests/comfy_scripts")
    from script_helpers import loaded_module
    pkg = loaded_module(cfg, cfg["package"])
    ours, native, exact = random_weights(cfg, pkg)
    write_gguf(cfg["gguf"], ours, cfg["spec"], Path(cfg["comfyui"]) / "comfy" / "text_encoders" / "qwen25_tokenizer")
    del ours
    rows, conds, layers = {}, {}, {}

    def keep(name, result):
        rows[name], conds[name], layers[name] = result

    if not cfg["smoke"]:  # ComfyUI's own classes only build the full size
        # The reference: ComfyUI's own encoder in fp32 on the CPU with its classic loader, fed the
        # file's values exactly: no bf16 rounding, no GPU, no dynamic VRAM, none of our code.
        keep(REFERENCE, measure(lambda: comfy.sd.load_text_encoder_state_dicts(
            [dict(exact)], clip_type=comfy.sd.CLIPType.QWEN_IMAGE, disable_dynamic=True,
            model_options={"load_device": torch.device("cpu"), "offload_device": torch.device("cpu"),
                           "initial_device": torch.device("cpu"), "dtype": torch.float32}), 1))
        keep("native bf16", measure(lambda: comfy.sd.load_text_encoder_state_dicts(
            [dict(native)], clip_type=comfy.sd.CLIPType.QWEN_IMAGE), cfg["runs"], generate=cfg["generate"],
            profile=cfg["profile"]))
        keep("native bf16, classic loader", measure(lambda: comfy.sd.load_text_encoder_state_dicts(
            [dict(native)], clip_type=comfy.sd.CLIPType.QWEN_IMAGE, disable_dynamic=True), cfg["runs"]))
    native.clear()
    exact.clear()

    def ours():
        return pkg.nodes.integration.text_encoder.build_clip(pkg.loaders.models.text_encoder.open_text_encoder(cfg["gguf"]))

    keep("ours, GGUF Q4_K_M", measure(ours, cfg["runs"], byte_checks(pkg), generate=cfg["generate"],
                                      profile=cfg["profile"]))
    # The same model with the torch dequantizers instead of the Triton kernels (same values bit for
    # bit): tells a kernel or launch fault from one of the loading path. (The switch is read once and
    # cached: cleared on the way in and out.)
    os.environ["QWEN_GGUF_TORCH_DEQUANT"] = "1"
    pkg.loaders.compat.triton_kernels.cache_clear()
    try:
        keep("ours, torch dequant", measure(ours, 2))
    finally:
        del os.environ["QWEN_GGUF_TORCH_DEQUANT"]
        pkg.loaders.compat.triton_kernels.cache_clear()
    # Ours computing in fp32 instead of bf16: tells bf16 rounding from a fault of the path.
    bf16_rule = pkg.nodes.integration.text_encoder.compute_dtype
    pkg.nodes.integration.text_encoder.compute_dtype = lambda device: torch.float32
    try:
        keep("ours, fp32 compute", measure(ours, 1))
    finally:
        pkg.nodes.integration.text_encoder.compute_dtype = bf16_rule
    rows["ours, GGUF Q4_K_M"]["rel_diff_to_torch_dequant"] = rel(conds["ours, GGUF Q4_K_M"],
                                                                 conds["ours, torch dequant"])
    if REFERENCE in rows:
        for name in rows:
            if name != REFERENCE:
                rows[name]["rel_diff_to_reference"] = rel(conds[name], conds[REFERENCE])
                rows[name]["layers_vs_reference"] = [rel(a, b) for a, b in zip(layers[name], layers[REFERENCE])]
    return {"rows": rows, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__}
