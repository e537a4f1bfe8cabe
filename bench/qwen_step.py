"""Seconds per sampling step, load time and peak VRAM of a full-size Qwen-Image in real ComfyUI on a
CUDA GPU: our GGUF loader in each mode against ComfyUI's native bf16 and fp8 loading of the same
weights, in one run. 1024x1024 and 1328x1328, CFG 4, dpmpp_2m / karras, batch-2 forwards.

    COMFYUI_PATH=../ComfyUI python bench/qwen_step.py [--steps N] [--sizes 1024,1328] [--layers 60]
        [--models "native bf16,ours, on the fly"] [--low-vram 12,8] [--profile] [--out result.json]

The weights are random (finite scales, the K-quant layouts of real files) in the Q4_K_M type mix of
city96's files, written to a GGUF file that our loader opens; the native models get the very same
values in bf16 (ComfyUI's own UNETLoader path, weight_dtype default / fp8_e4m3fn / fp8_e4m3fn_fast).
Runs inside ComfyUI as main.py starts it (its allocator settings and its dynamic VRAM loader, on by
default on NVIDIA). Load time: from the file (ours) or the bf16 state dict in RAM (native) to loaded
on the GPU. Peak VRAM is the GPU's memory in use (cudaMemGetInfo), since the dynamic loader keeps
weights outside torch's counters. --low-vram N runs the auto mode again in a ComfyUI told to leave all but N GB of the GPU
alone (--reserve-vram), to show generations complete within it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# "ours, on the fly + NaN guard" times the on-the-fly model with and without the guard, taking turns.
# A variant can leave GPU memory behind that slows the next one and swells its peak: the modes that
# make no copies come first, and ComfyUI's native fp8 models, which do not hand all their VRAM back,
# last. The table shows the memory in use before each variant loads.
MODELS = ["native bf16", "ours, on the fly + NaN guard", "ours, fp8 on the fly", "ours, cached", "ours, fp8 compute",
          "ours, auto", "native fp8_e4m3fn", "native fp8_e4m3fn_fast"]
# Not run by default: our model on ComfyUI's classic patcher (no dynamic loader), for comparison.
CLASSIC = ["ours, on the fly, classic loader", "ours, fp8 compute, classic loader"]


def gpu_total_gb() -> float:
    import torch
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def _error(row: dict) -> str:
    e = row.get("latent_rel_error")
    return "-" if e is None or row["model"] == "native bf16" else f"{100 * e:.2f}%"


def guard_cost(rows: list[dict]) -> None:
    """The guard's cost per step, round by round (each round ran both models back to back)."""
    for size in sorted({r["size"] for r in rows}):
        pair = {r["model"]: r for r in rows if r["size"] == size}
        plain, guarded = pair.get("ours, on the fly"), pair.get("ours, on the fly + NaN guard")
        if not plain or not guarded:
            continue
        diffs = sorted(g - p for g, p in zip(guarded["round_medians"], plain["round_medians"]))
        base = statistics.median(plain["round_medians"])
        print(f"NaN guard at {size}x{size}: per-round cost {', '.join(f'{1000 * d:+.1f}' for d in diffs)} ms/step; "
              f"median {1000 * statistics.median(diffs):+.1f} ms/step ({100 * statistics.median(diffs) / base:+.1f}% "
              f"of {base:.3f} s/step), over {len(diffs)} rounds")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sizes", default="1024,1328")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--models", default=";".join(MODELS), help="';'-separated, from: " + "; ".join(MODELS + CLASSIC))
    parser.add_argument("--low-vram", default="12,8", help="GB limits for the low-VRAM runs ('' for none)")
    parser.add_argument("--guard-rounds", type=int, default=3,
                        help="alternating rounds of the on-the-fly model with and without the guard (the first untimed)")
    parser.add_argument("--profile", action="store_true", help="also print where the host's time goes")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--cpu", action="store_true", help="a smoke run of this script on the CPU (no figures)")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import PACKAGE_NAME, run_script
    work = Path(tempfile.mkdtemp())
    (work / "models").mkdir()
    common = dict(timeout=3000, device="cpu" if a.cpu else "cuda", package=PACKAGE_NAME, steps=a.steps,
                  sizes=[int(s) for s in a.sizes.split(",")], layers=a.layers, repo=str(REPO),
                  gguf=str(work / "random-qwen-image-Q4_K_M.gguf"), profile=a.profile,
                  guard_rounds=a.guard_rounds)
    script = REPO / "bench" / "qwen_step_inside.py"
    result = run_script(work, work / "models", script, args=["--cpu"] if a.cpu else [],
                        variants=a.models.split(";"), **common)
    low_vram = []
    for limit in [float(x) for x in a.low_vram.split(",") if x] if not a.cpu else []:
        reserve = gpu_total_gb() - limit
        r = run_script(work, work / "models", script, args=["--reserve-vram", f"{reserve:.1f}"],
                       variants=["ours, auto"], reuse_gguf=True, **{**common, "profile": False})
        low_vram += [{**row, "limit_gb": limit} for row in r["rows"]]
    result["low_vram"] = low_vram
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    for name, text in result.get("profiles", {}).items():
        print(f"--- host profile, {name} ---\n{text}")
    print(f"GPU: {result['gpu']}; torch {result['torch']}; ComfyUI {result['comfyui']}; "
          f"dynamic VRAM: {result['dynamic_vram']}")
    print("| model | size | s/step (median) | vs native bf16 | first step (s) | load (s) | peak VRAM | "
          "final latent vs native bf16 | in use before loading |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        base = next((r for r in result["rows"] if r["size"] == row["size"] and r["model"] == "native bf16"), None)
        ratio = f"{row['s_per_step'] / base['s_per_step']:.2f}x" if base else "-"
        print(f"| {row['model']} | {row['size']}x{row['size']} | {row['s_per_step']:.3f} | "
              f"{ratio} | {row['first_step_s']:.1f} | {row['load_s']:.1f} | "
              f"{row['peak_vram_gb']:.1f} GB | {_error(row)} | {row['vram_before_load_gb']:.1f} GB |")
    guard_cost(result["rows"])
    for row in low_vram:
        print(f"| ours, auto, ComfyUI limited to {row['limit_gb']:.0f} GB | {row['size']}x{row['size']} | "
              f"{row['s_per_step']:.3f} | | {row['first_step_s']:.1f} | {row['load_s']:.1f} | {row['peak_vram_gb']:.1f} GB |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
