"""Host time per Linear layer call of Qwen-Image in real ComfyUI on a CUDA GPU: ComfyUI's native bf16
model against ours (on the fly, fp8 compute), each loaded as ComfyUI loads it (its dynamic VRAM
loader where it is on), the layers of one transformer block called in the model's order.

    COMFYUI_PATH=../ComfyUI python bench/layer_host.py [--calls 300] [--rows 64] [--profile]

At 1024x1024 on an H100 ComfyUI's sampling waits on the host, so what a layer costs the host decides
the step time there. Host time is what the host spends issuing a pass over the block's layers, the
GPU synchronized between passes (outside the timing) so that no launch waits on it; wall time, passes
run back to back, says whether the GPU keeps up. The inputs are small (``--rows`` rows, above the fused
kernel's limit). Full-width weights (random, the Q4_K_M mix), two transformer blocks; all models loaded
at once and timed in turns (median of rounds).
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
    parser.add_argument("--calls", type=int, default=300, help="timed passes over the block's layers")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="timings per model, the models taking turns")
    parser.add_argument("--profile", action="store_true", help="also print where the host's time goes")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import PACKAGE_NAME, run_script
    work = Path(tempfile.mkdtemp())
    (work / "models").mkdir()
    result = run_script(work, work / "models", REPO / "bench" / "layer_host_inside.py", timeout=1800, args=[],
                        device="cuda", package=PACKAGE_NAME, repo=str(REPO), layers=2, calls=a.calls, rounds=a.rounds,
                        rows=a.rows, profile=a.profile, gguf=str(work / "random-qwen-image-Q4_K_M.gguf"))
    for name, text in result["profiles"].items():
        print(f"--- host profile, {name} ---\n{text}")
    print(f"GPU: {result['gpu']}; torch {result['torch']}; ComfyUI {result['comfyui']}; "
          f"dynamic VRAM: {result['dynamic_vram']}; {a.rows} rows per call")
    print("| model | host us per layer call (block average, median of rounds) | vs native bf16 on the same loader | "
          "extra host per 60-block step | wall us per call, back to back | layers running a copy |")
    print("|---|---|---|---|---|---|")
    rows, walls = result["rows"], result["walls"]
    for name, us in rows.items():
        # Each row against native bf16 under the same loader (the classic one's rows say so).
        base = rows.get("native bf16, classic loader" if name.endswith("classic loader") else "native bf16")
        ratio = f"{us / base:.2f}x" if base else "-"
        extra = f"{(us - base) * result['layers_per_block'] * 60 / 1000:+.1f} ms" if base else "-"
        print(f"| {name} | {us:.1f} | {ratio} | {extra} | {walls[name]:.1f} | {result['copies'][name]} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
