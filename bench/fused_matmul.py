"""The fused dequant-matmul against dequant + cuBLAS, for few tokens, on the weight shapes of
Qwen2.5-VL-7B (the text encoder) and Qwen-Image (its per-step modulation takes 2 rows). Needs CUDA:

    python bench/fused_matmul.py [--sweep] [--types Q4_K,Q6_K,...]

Per type, shape and token count: the median time (triton.testing.do_bench) of the fused kernel and
of dequant (our Triton kernel) + torch.nn.functional.linear, their ratio, and which one the layer's
automatic choice (the shape rule in loaders.quant.plan) takes. ``--sweep`` also times other tile shapes
of the fused kernel (at 2 and 16 tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.testing
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dequant_bandwidth import random_blocks  # noqa: E402
from loaders.quant.formats import FORMATS, KERNEL_FORMATS  # noqa: E402
from loaders.quant.kernels.matmul import FusedMatmul  # noqa: E402
from loaders.quant.plan import FUSED_SPLIT_ELEMENTS, fused_rows  # noqa: E402
from loaders.quant.weight import dequantize_bytes  # noqa: E402

# (what, out_features, in_features, token counts)
SHAPES = [
    ("Qwen2.5-VL-7B q_proj", 3584, 3584, (1, 16, 64, 300)),
    ("Qwen2.5-VL-7B k_proj", 512, 3584, (1, 16, 64, 300)),
    ("Qwen2.5-VL-7B gate_proj", 18944, 3584, (1, 8, 16, 32, 64, 300)),
    ("Qwen2.5-VL-7B down_proj", 3584, 18944, (1, 8, 16, 32, 64, 300)),
    ("Qwen-Image img_mod", 18432, 3072, (2,)),
]


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def sweep(qtype: T, raw: torch.Tensor, shape, x: torch.Tensor) -> str:
    results = []
    for block_n in (16, 32, 64):
        for warps in (2, 4):
            for stages in (2, 3, 4):
                try:
                    # Bound once, as a layer binds it: the timing is the kernel's, not the binding's.
                    fused = FusedMatmul(FORMATS[qtype], shape, x.device, block_n, warps, stages)
                    ms = median_ms(lambda: fused(x, raw))
                except triton.runtime.errors.OutOfResources:
                    continue
                results.append((ms, f"BN{block_n} w{warps} s{stages}"))
    results.sort()
    return ", ".join(f"{name} {ms:.3f}" for ms, name in results[:3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--types", default=",".join(f.name for f in KERNEL_FORMATS))
    a = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| type | weight | tokens | fused ms | dequant + cuBLAS ms | fused speed-up | automatic choice |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for qtype in [T[name] for name in a.types.split(",")]:
        qcls = FORMATS[qtype]
        for what, n, k, token_counts in SHAPES:
            raw = random_blocks(qtype, n * k // qcls.block_size).reshape(n, -1)
            for m in token_counts:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                # As a layer's plan binds it: K split only on large weights.
                fused = FusedMatmul(qcls, (n, k), x.device, may_split=n * k >= FUSED_SPLIT_ELEMENTS)
                fused_ms = median_ms(lambda: fused(x, raw))
                plain_ms = median_ms(lambda: torch.nn.functional.linear(
                    x, dequantize_bytes(raw, qcls, (n, k), torch.bfloat16)))
                chose = m <= fused_rows(qcls, (n, k))
                print(f"| {qtype.name} | {what} {n}x{k} | {m} | {fused_ms:.3f} | {plain_ms:.3f} | "
                      f"{plain_ms / fused_ms:.2f}x | {'fused' if chose else 'dequant + cuBLAS'} |")
                if a.sweep and m in (2, 16):
                    print(f"  sweep: {sweep(qtype, raw, (n, k), x)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
