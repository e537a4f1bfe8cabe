"""Load and encode time of a full-size Qwen2.5-VL-7B language model as text encoder in real ComfyUI on a
CUDA GPU: our GGUF CLIP-VL loader (llama.cpp's Q4_K_M type mix and names, tokenizer from the file's
metadata) against ComfyUI's own loading of the same values in bf16 (Hugging Face names, as Comfy-Org's
qwen_2.5_vl_7b.safetensors), in one run. Weights are random (small finite scales); the prompt is
encoded through ComfyUI's Qwen-Image template, as CLIPTextEncode does.

Every conditioning (and each decoder layer's output) is compared with a reference: ComfyUI's own
encoder in fp32 on the CPU with its classic loader, fed the file's values exactly. The run fails
(exit 1) when ours differs from it by more than BOUND after the last layer.

    COMFYUI_PATH=../ComfyUI python bench/text_encoder.py [--runs 5] [--out result.json] [--comfy-args=--disable-dynamic-vram]

Load = building the CLIP from the file (ours) or the bf16 state dict in RAM (native); first encode
includes bringing the weights to the GPU; encode = median of the following runs; peak VRAM = the
GPU's memory in use. Text generation (``--generate N``): greedy tokens per second through ComfyUI's
own generation path (its TextGenerate node's), N tokens after the prompt, ours against native bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bf16 rounding through 28 layers compounds to about 1e-2 (ComfyUI's own bf16 encoder: 1.4e-2 from the
# reference, on an H100); a wrong weight, mask or rope is 1e-1 or more. Same bound as tests/integration/test_gpu.py.
BOUND = 2.5e-2
REFERENCE_NOTE = "ComfyUI's own encoder in fp32 on the CPU, classic loader, the file's values exactly"
QWEN25_VL_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--generate", type=int, default=128, help="greedy tokens generated per timing (0: none)")
    parser.add_argument("--profile", action="store_true", help="print where generation's host time goes")
    parser.add_argument("--seed", type=int, default=0, help="the random model's seed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu", action="store_true", help="a smoke run of this script on the CPU with a 2-layer model")
    parser.add_argument("--comfy-args", default="", help="ComfyUI command-line options for the run, e.g. --disable-dynamic-vram")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import PACKAGE_NAME, comfyui_path, run_script
    work = Path(tempfile.mkdtemp())
    (work / "models").mkdir()
    spec = {**QWEN25_VL_7B, "layers": 2, "hidden": 512, "intermediate": 1024, "heads": 4} if a.cpu else QWEN25_VL_7B
    result = run_script(work, work / "models", REPO / "bench" / "text_encoder_inside.py", timeout=3000,
                        args=(["--cpu"] if a.cpu else []) + shlex.split(a.comfy_args), device="cpu" if a.cpu else "cuda",
                        package=PACKAGE_NAME, repo=str(REPO), spec=spec, runs=a.runs, smoke=a.cpu, seed=a.seed,
                        generate=a.generate, profile=a.profile,
                        gguf=str(work / "random-Qwen2.5-VL-7B-Q4_K_M.gguf"), comfyui=str(comfyui_path()))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"GPU: {result['gpu']}; torch {result['torch']}")
    print("| text encoder | load (s) | first encode (s) | encode (s, median) | vs native | tokens | peak VRAM |")
    print("|---|---|---|---|---|---|---|")
    native = result["rows"].get("native bf16")
    for name, r in result["rows"].items():
        ratio = f"{r['encode_s'] / native['encode_s']:.2f}x" if native else "-"
        print(f"| {name} | {r['load_s']:.1f} | {r['first_encode_s']:.2f} | {r['encode_s']:.3f} | "
              f"{ratio} | {r['tokens']} | {r['peak_vram_gb']:.1f} GB |")
    generating = {name: r for name, r in result["rows"].items() if "generate_tok_s" in r}
    if generating:
        print(f"\n| text generation, greedy, {a.generate} tokens | tokens/s | vs native | peak VRAM | in use before | "
              "torch's peak allocated / held |")
        print("|---|---|---|---|---|---|")
        base = generating.get("native bf16", {}).get("generate_tok_s")
        for name, r in generating.items():
            ratio = f"{r['generate_tok_s'] / base:.2f}x" if base else "-"
            torch_peaks = (f"{r['generate_torch_allocated_peak_gb']:.1f} / {r['generate_torch_reserved_peak_gb']:.1f} GB"
                           if "generate_torch_allocated_peak_gb" in r else "-")
            print(f"| {name} | {r['generate_tok_s']:.1f} | {ratio} | {r['generate_peak_vram_gb']:.1f} GB | "
                  f"{r['generate_vram_before_gb']:.1f} GB | {torch_peaks} |")
    ours = result["rows"]["ours, GGUF Q4_K_M"]
    for name, r in generating.items():
        if "generate_profile" in r:
            print(f"\n--- host profile of generating 16 tokens, {name} ---\n{r['generate_profile']}")
    print(f"conditioning, ours against ours with the torch dequantizers: relative difference "
          f"{ours['rel_diff_to_torch_dequant']:.2e}")
    for name, r in result["rows"].items():
        print(f"conditioning, {name}: runs differ from the first by up to {r['runs_vs_first']:.2e}")
    if "checks" in ours:
        c = ours["checks"]
        print(f"conditioning, checks after our encodes: {c['resident_layers']} layers resident; bytes differing "
              f"from the file: {c['wrong_bytes'] or 'none'}; Triton fp32 values differing from the torch "
              f"dequantizers: {c['wrong_values'] or 'none'}")
    rows = result["rows"]
    if any("rel_diff_to_reference" in r for r in rows.values()):
        print(f"conditioning against the reference ({REFERENCE_NOTE}): relative difference after the last layer, "
              "then after each decoder layer")
        for name, r in rows.items():
            if "rel_diff_to_reference" in r:
                print(f"| {name} | {r['rel_diff_to_reference']:.2e} | "
                      + " ".join(f"{d:.1e}" for d in r["layers_vs_reference"]) + " |")
        worst = ours["rel_diff_to_reference"]
        if worst > BOUND:
            print(f"conditioning: FAILED: ours differs from the reference by {worst:.2e} (bound {BOUND:.0e})")
            sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
