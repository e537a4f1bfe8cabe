"""Seconds per sampling step of a full-size Qwen-Image in real ComfyUI on a CUDA GPU: our GGUF model
(Q4_K_M type mix of real files, dequantized on the fly) against ComfyUI's native bf16 model of the
same weights, in one run. 1024x1024 (and 1328x1328), CFG 4, dpmpp_2m / karras, batch-2 forwards.

    COMFYUI_PATH=../ComfyUI python bench/qwen_step.py [--steps N] [--sizes 1024,1328] [--layers 60]

The weights are random (finite scales, the K-quant layouts of real files); the native model gets the
very same values in bf16. Runs inside ComfyUI as main.py starts it (its allocator settings and its
dynamic VRAM loader, on by default on NVIDIA). Peak VRAM is read with nvidia-smi, since the dynamic
loader keeps weights outside torch's counters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default="1024,1328")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--cpu", action="store_true", help="a smoke run of this script on the CPU (no figures)")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import PACKAGE_NAME, run_script
    work = Path(tempfile.mkdtemp())
    (work / "models").mkdir()
    result = run_script(work, work / "models", REPO / "bench" / "qwen_step_inside.py", timeout=3000,
                        args=["--cpu"] if a.cpu else [], device="cpu" if a.cpu else "cuda",
                        package=PACKAGE_NAME, steps=a.steps, sizes=[int(s) for s in a.sizes.split(",")],
                        layers=a.layers, repo=str(REPO))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"GPU: {result['gpu']}; torch {result['torch']}; ComfyUI {result['comfyui']}; "
          f"dynamic VRAM: {result['dynamic_vram']}")
    print("| model | size | s/step (median) | vs native bf16 | peak VRAM (nvidia-smi) |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        base = next(r for r in result["rows"] if r["size"] == row["size"] and r["model"] == "native bf16")
        print(f"| {row['model']} | {row['size']}x{row['size']} | {row['s_per_step']:.3f} | "
              f"{row['s_per_step'] / base['s_per_step']:.2f}x | {row['peak_vram_gb']:.1f} GB |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
