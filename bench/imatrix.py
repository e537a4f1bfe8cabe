"""Does an importance matrix lower the error of a whole Qwen-Image's final latent? A random
full-size Qwen-Image in bf16 (ComfyUI's native model) samples a few prompts through the importance
collector; the model is then saved at a level with and without the matrix (the same file size), and
both files, loaded by our loader, sample held-out prompts whose final latents are compared with the
bf16 model's, in one run inside ComfyUI on a CUDA GPU.

    COMFYUI_PATH=../ComfyUI python bench/imatrix.py [--level Q4_K_M] [--prompts 4] [--held-out 2]
        [--size 1024] [--steps 10] [--layers 60] [--cpu]

The weights are random, so this measures the method on activations of a random model, not of the
trained one. The conditioning is random too (96 tokens), CFG 4, dpmpp_2m / karras.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--level", default="Q4_K_M")
    parser.add_argument("--prompts", type=int, default=4, help="prompts collected from")
    parser.add_argument("--collect-size", type=int, default=512)
    parser.add_argument("--collect-steps", type=int, default=6)
    parser.add_argument("--held-out", type=int, default=2, help="prompts compared")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--cpu", action="store_true", help="a smoke run of this script on the CPU with a tiny model")
    a = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from comfy_env import PACKAGE_NAME, run_script
    from tiny_models import QWEN_IMAGE
    spec = dict(QWEN_IMAGE) if a.cpu else dict(layers=a.layers, heads=24, head_dim=128, text_dim=3584, mlp=12288,
                                               in_channels=64, out_channels=16)
    work = Path(tempfile.mkdtemp())
    (work / "models" / "diffusion_models").mkdir(parents=True)
    result = run_script(work, work / "models", REPO / "bench" / "imatrix_inside.py", args=["--cpu"] if a.cpu else [],
                        timeout=3000, device="cpu" if a.cpu else "cuda", package=PACKAGE_NAME, repo=str(REPO),
                        work=str(work), spec=spec, level=a.level, prompts=a.prompts, collect_size=a.collect_size,
                        collect_steps=a.collect_steps, held_out=a.held_out, size=a.size, steps=a.steps)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"GPU: {result['gpu']}; torch {result['torch']}; collected {result['weights_collected']} weights from "
          f"{a.prompts} prompts in {result['collect_s']:.1f} s")
    print(f"| {a.level} | file bytes | convert (s) | final latent vs bf16, per held-out prompt | median |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        errors = row["latent_rel_errors"]
        print(f"| {row['file']} | {row['bytes']:,} | {row['convert_s']:.1f} | "
              f"{', '.join(f'{100 * e:.2f}%' for e in errors)} | {100 * statistics.median(errors):.2f}% |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
