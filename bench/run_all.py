"""Every benchmark of this package in one run, on one CUDA GPU, for the README's Performance section:

    COMFYUI_PATH=../ComfyUI python bench/run_all.py [--out DIR] [--quick]

In order: seconds per step, load time, peak VRAM and final-latent error of a full-size Qwen-Image in
ComfyUI (qwen_step.py: our loader in each mode against native bf16 and fp8_e4m3fn_fast, 1024x1024 and
1328x1328, then the auto mode with ComfyUI limited to 12 and 8 GB), the text encoder's load and encode
time (text_encoder.py), each dequant kernel's bandwidth against the copy bandwidth
(dequant_bandwidth.py), the fp8 matmuls (fp8_matmul.py), the fused dequant-matmul (fused_matmul.py),
opening a GGUF with a 152k-token tokenizer (open_gguf.py), host time per layer call
(layer_host.py), loading in each mode with the first steps (load_time.py), seconds per step as the
image grows (qwen_step.py at 512 to 2048 px) and whole presets over HTTP against the same graphs
through ComfyUI's own loaders on bf16 and fp8 weights (presets.py). Each writes its whole output to DIR/<name>.log; DIR/summary.md gets every table, with
the GPU, the versions, the date and the commands, and is printed at the end. --quick runs fewer steps;
--only runs the named ones (comma-separated); --limit SECONDS stops a benchmark that runs longer (with
the processes it started) and goes on to the next. A log is written as its benchmark runs, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# In qwen_step.py's own order: the modes that make copies after those that make none, native fp8 last
# (what each leaves on the GPU).
STEP_MODELS = ("native bf16;ours, on the fly + NaN guard;ours, fp8 on the fly;ours, cached;ours, fp8 compute;"
               "native fp8_e4m3fn_fast")


# Whole presets: each model set's runs together (the disk holds one run's files at a time), ours and
# ComfyUI's own loaders on bf16 and on fp8 weights.
PRESET_RUNS = [f"{preset}:{loader}:0" for quant, preset_set in (
    ("Q4_K_M", ("Qwen-Image-2512 - 20 steps", "Qwen-Image-2512 - 40 steps", "Qwen-Image-2512 - 60 steps")),
    ("Q4_K_M", ("Qwen-Image-Edit-2511 - 1 image",)), ("Q4_K", ("Z-Image-Turbo - 8 steps",)))
    for loader in ("native-bf16", "native-fp8", quant) for preset in preset_set]


def runs(quick: bool) -> list[tuple[str, list[str]]]:
    steps = ["--steps", "3"] if quick else ["--steps", "5"]
    preset_runs = [r for r in PRESET_RUNS if not quick or "20 steps" in r or "Z-Image" in r]
    return [
        ("qwen_step", ["qwen_step.py", *steps, "--models", STEP_MODELS, "--low-vram", "12,8"]),
        ("text_encoder", ["text_encoder.py"]),
        ("dequant_bandwidth", ["dequant_bandwidth.py"]),
        ("fp8_matmul", ["fp8_matmul.py"]),
        ("fused_matmul", ["fused_matmul.py"]),
        ("open_gguf", ["open_gguf.py"]),
        ("layer_host", ["layer_host.py"]),
        ("load_time", ["load_time.py"]),
        ("quantize", ["quantize.py", "--sample", "1"]),
        ("imatrix", ["imatrix.py", "--prompts", "3", "--collect-steps", "4", "--held-out", "2", "--steps", "8"]),
        ("sizes", ["qwen_step.py", "--steps", "3", "--sizes", "512,1024,1328,2048", "--low-vram", "",
                   "--models", "native bf16;ours, on the fly;ours, fp8 on the fly;ours, cached;ours, fp8 compute"]),
        ("presets", ["presets.py", "--images", "3", *(arg for r in preset_runs for arg in ("--runs", r))]),
    ]


def run_limited(command: list[str], sink, limit: float | None) -> int | None:
    """Run a benchmark, its output to ``sink``; past ``limit`` seconds it is stopped with everything it
    started (its ComfyUI among them) and None is returned: what it printed so far stays in its log."""
    proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    finally:
        # In a session of its own, it would outlive this script (stopped by Ctrl-C, SIGTERM or a
        # limit of its own) and keep the GPU: whatever ends the wait ends the benchmark too.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tables(text: str) -> str:
    """The lines a benchmark prints for the README: its tables and the lines around them."""
    keep = [line for line in text.splitlines()
            if line.startswith(("|", "GPU:", "NaN guard", "conditioning", "copy", "weight", "slowest", "ratio"))]
    return "\n".join(keep)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--limit", type=float, default=None,
                        help="seconds each benchmark may run; one cut there keeps what it printed (its log)")
    parser.add_argument("--only", default="", help="comma-separated names, from: " + ", ".join(n for n, _ in runs(False)))
    a = parser.parse_args()
    # SIGTERM (a time limit around this script) unwinds like Ctrl-C, so the running benchmark is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = {n for n in a.only.split(",") if n}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:  # no git where the tree was copied to
        commit = "unknown"
    summary = [f"# Benchmarks, {datetime.date.today().isoformat()}, commit {commit}", ""]
    for name, command in runs(a.quick):
        if only and name not in only:
            continue
        start = time.perf_counter()
        log = out / f"{name}.log"
        with log.open("w") as sink:
            code = run_limited([sys.executable, str(BENCH / command[0]), *command[1:]], sink, a.limit)
        seconds = time.perf_counter() - start
        status = ("" if code == 0 else f" CUT at the {a.limit:.0f} s limit (see {name}.log)" if code is None
                  else f" FAILED (exit {code}, see {name}.log)")
        summary += [f"## {name}{status}", "", f"`python bench/{' '.join(command)}` ({seconds:.0f} s)", "",
                    tables(log.read_text()), ""]
        (out / "summary.md").write_text("\n".join(summary))
        print(f"{name}: {seconds:.0f} s{status}", flush=True)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
