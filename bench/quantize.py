"""Encoding a full-size Qwen-Image (20B, city96's mix of a level) on a CUDA GPU, against our CPU path
and llama.cpp's single-threaded C reference quantizers in the same run, the bytes compared:

    python bench/quantize.py [--level Q4_K_M] [--sample 8] [--cpu]

Weights are random (unit gain), generated on the GPU; reading and writing files is not counted.
GPU: every quantized tensor of the model, encoded in turn (synchronized), total seconds. CPU and
C reference: ``--sample`` tensors of each block type (whole tensors, the model's shapes), their
elements per second, and the model's total at that rate (the CPU path on every core of this
machine, the reference on one). Every sampled tensor's GPU bytes are compared with both; the run
fails (exit 1) on a difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from llama_cpp_ref import quantize_ref, reference, why_not  # noqa: E402
from loaders.convert.recipes import IMAGE_ARCHS, LEVELS, image_recipe  # noqa: E402
from loaders.quant.formats import FORMATS  # noqa: E402
from tiny_models import QWEN_IMAGE, qwen_image_shapes  # noqa: E402

QWEN_IMAGE_20B = dict(layers=60, heads=24, head_dim=128, text_dim=3584, mlp=12288, in_channels=64, out_channels=16)


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="Q4_K_M", choices=[n for n, lv in LEVELS.items() if lv.bulk in FORMATS])
    ap.add_argument("--sample", type=int, default=8, help="tensors of each type timed on the CPU paths")
    ap.add_argument("--cpu", action="store_true", help="a smoke run of this script on the CPU with a tiny model")
    a = ap.parse_args()
    spec, device = (QWEN_IMAGE, "cpu") if a.cpu else (QWEN_IMAGE_20B, "cuda")
    recipe = image_recipe(LEVELS[a.level], IMAGE_ARCHS["qwen_image"], spec["layers"], T.BF16)
    plan = [(n, s, recipe(n, s)) for n, s in qwen_image_shapes(**spec).items()]
    plan = [(n, s, q) for n, s, q in plan if q in FORMATS]
    g = torch.Generator(device=device).manual_seed(0)
    lib = reference()
    if lib is None:
        print(f"C reference: not built ({why_not})")
    gpu_s, elements, sampled = 0.0, defaultdict(int), defaultdict(int)
    cpu, ref = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    wrong = []
    FORMATS[T.Q4_K].encode(torch.randn(8, 256, device=device))  # CUDA context and kernels loaded
    for done, (name, shape, qtype) in enumerate(plan):
        if done % 100 == 0:  # a run cut short still says how far it got
            print(f"{done}/{len(plan)} tensors, GPU {gpu_s:.1f} s so far", flush=True)
        x = torch.randn(shape, device=device, generator=g) / shape[-1] ** 0.5
        got, seconds = timed(FORMATS[qtype].encode, x)
        gpu_s += seconds
        elements[qtype] += x.numel()
        if sampled[qtype] < a.sample:
            sampled[qtype] += 1
            host = x.cpu().numpy()
            start = time.perf_counter()
            on_cpu = FORMATS[qtype].encode(host)
            cpu[qtype][0] += x.numel()
            cpu[qtype][1] += time.perf_counter() - start
            if not np.array_equal(on_cpu, got.cpu().numpy()):
                wrong.append(f"{name}: GPU bytes differ from the CPU path's")
            if lib is not None:
                start = time.perf_counter()
                c = quantize_ref(lib, qtype.name.lower().replace("_k", "_K"), host.reshape(-1, shape[-1]))
                ref[qtype][0] += x.numel()
                ref[qtype][1] += time.perf_counter() - start
                if not np.array_equal(c.reshape(on_cpu.shape), on_cpu):
                    wrong.append(f"{name}: bytes differ from llama.cpp's reference")
        del x, got
    total = sum(elements.values())
    print(f"GPU: {torch.cuda.get_device_name() if device == 'cuda' else 'none (--cpu)'}; torch {torch.__version__}; {a.level}, {len(plan)} quantized "
          f"tensors, {total / 1e9:.2f}G elements")
    # What the CPU path ran on: its pool's threads against the CPUs this process may use (affinity)
    # and its cgroup's CPU quota, where one is set.
    quota = Path("/sys/fs/cgroup/cpu.max")
    quota = quota.read_text().strip() if quota.exists() else "-"
    print(f"CPU: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} in this process's affinity, cgroup cpu.max "
          f"{quota}; torch intra-op threads {torch.get_num_threads()} (the encode pool's size)")
    print("| path | elements timed | elements/s | the whole model |")
    print("|---|---|---|---|")
    print(f"| ours, GPU | all | {total / gpu_s / 1e6:.0f} M | {gpu_s:.1f} s |")
    for label, runs in (("ours, CPU (every core)", cpu), ("llama.cpp reference, CPU (one thread)", ref)):
        if runs:
            # The model's time at each type's measured rate.
            whole = sum(elements[q] * seconds / n for q, (n, seconds) in runs.items())
            timed_n = sum(n for n, _ in runs.values())
            print(f"| {label} | {timed_n / 1e9:.2f}G | {timed_n / sum(s for _, s in runs.values()) / 1e6:.1f} M | "
                  f"{whole:.0f} s |")
    if wrong:
        print("bytes: FAILED\n" + "\n".join(wrong[:20]))
        sys.exit(1)
    print(f"bytes: every sampled tensor the same on the GPU, the CPU path{' and the C reference' if lib else ''}")


if __name__ == "__main__":
    main()
