"""Every benchmark of this package in one run, on one CUDA GPU, for the README's Performance section:

    COMFYUI_PATH=../ComfyUI python bench/run_all.py [--out DIR] [--quick]

In order: seconds per step, load time, peak VRAM and final-latent error of a full-size Qwen-Image in
ComfyUI (qwen_step.py: our loader in each mode against native bf16 and fp8_e4m3fn_fast, 1024x1024 and
1328x1328, then the auto mode with ComfyUI limited to 12 and 8 GB), host time per layer call
(layer_host.py), the text encoder's load and encode time (text_encoder.py), each dequant kernel's
bandwidth against the copy bandwidth (dequant_bandwidth.py), the fused dequant-matmul
(fused_matmul.py), the fp8 matmuls (fp8_matmul.py) and opening a GGUF with a 152k-token tokenizer
(open_gguf.py). Each writes its whole output to DIR/<name>.log; DIR/summary.md gets every table, with
the GPU, the versions, the date and the commands, and is printed at the end. --quick runs fewer steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
STEP_MODELS = "native bf16;native fp8_e4m3fn_fast;ours, on the fly + NaN guard;ours, cached;ours, fp8 compute"


def runs(quick: bool) -> list[tuple[str, list[str]]]:
    steps = ["--steps", "3"] if quick else ["--steps", "5"]
    return [
        ("qwen_step", ["qwen_step.py", *steps, "--models", STEP_MODELS, "--low-vram", "12,8"]),
        ("layer_host", ["layer_host.py"]),
        ("text_encoder", ["text_encoder.py"]),
        ("dequant_bandwidth", ["dequant_bandwidth.py"]),
        ("fused_matmul", ["fused_matmul.py"]),
        ("fp8_matmul", ["fp8_matmul.py"]),
        ("open_gguf", ["open_gguf.py"]),
    ]


def tables(text: str) -> str:
    """The lines a benchmark prints for the README: its tables and the lines around them."""
    keep = [line for line in text.splitlines()
            if line.startswith(("|", "GPU:", "NaN guard", "conditioning", "copy", "weight", "slowest", "ratio"))]
    return "\n".join(keep)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    summary = [f"# Benchmarks, {datetime.date.today().isoformat()}, commit {commit}", ""]
    for name, command in runs(a.quick):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / command[0]), *command[1:]], capture_output=True,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - start
        (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        status = "" if proc.returncode == 0 else f" FAILED (exit {proc.returncode}, see {name}.log)"
        summary += [f"## {name}{status}", "", f"`python bench/{' '.join(command)}` ({seconds:.0f} s)", "",
                    tables(proc.stdout), ""]
        (out / "summary.md").write_text("\n".join(summary))
        print(f"{name}: {seconds:.0f} s{status}", flush=True)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
