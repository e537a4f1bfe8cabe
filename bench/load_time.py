"""Loading a full-size Qwen-Image GGUF (random weights, the Q4_K_M mix) in each mode, and its first
sampling steps, against ComfyUI's native bf16 model of the same values, in one ComfyUI process on a
CUDA GPU (its default loader: the dynamic VRAM one where it is on).

    COMFYUI_PATH=../ComfyUI python bench/load_time.py [--layers 60] [--size 1024]

Load is the loader call (the file's page cache warm); the first step includes ComfyUI bringing the
model to the GPU (and, in the cached and fp8 modes, each layer converting its bytes there); the
second step is a step of a loaded model. Peak VRAM is the whole GPU's during the two steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (the latent is 1/8)")
    parser.add_argument("--modes", default="on the fly,cached,fp8 compute")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import PACKAGE_NAME, run_script
    work = Path(tempfile.mkdtemp())
    (work / "models").mkdir()
    r = run_script(work, work / "models", REPO / "bench" / "load_time_inside.py", timeout=3000, args=[],
                   device="cuda", package=PACKAGE_NAME, repo=str(REPO), layers=a.layers, size=a.size,
                   modes=a.modes.split(","), gguf=str(work / "random-qwen-image-Q4_K_M.gguf"))
    print(f"GPU: {r['gpu']}; torch {r['torch']}; ComfyUI {r['comfyui']}; dynamic VRAM: {r['dynamic_vram']}; "
          f"{a.layers} blocks, {a.size}x{a.size}, CFG batch 2")
    print("| model | load s | first step s | vs native | second step s | peak VRAM GiB |")
    print("|---|---|---|---|---|---|")
    native = r["rows"]["native bf16"]["first"]
    for name, row in r["rows"].items():
        print(f"| {name} | {row['load']:.2f} | {row['first']:.2f} | {row['first'] / native:.2f}x | "
              f"{row['second']:.3f} | {row['peak'] / 2**30:.1f} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
