"""Each Triton dequant kernel's throughput against the GPU's copy bandwidth, measured in the same run,
with the torch path (the same math as 15-25 small torch ops) alongside. Needs a CUDA GPU:

    python bench/dequant_bandwidth.py [--sweep] [--types Q3_K,Q6_K] [rows cols]

``--sweep`` also times other tile shapes (blocks per program, warps) per type, to choose each type's
``tile`` / ``gpu_tiles`` in loaders/quant/formats.py; the main table uses this GPU's. ``--types``
measures only the named types.

Bytes counted per kernel: the quantized bytes read plus the bf16 bytes written, as for the copy
(bytes read + bytes written). Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import triton.testing
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loaders.quant.formats import FORMATS, KERNEL_FORMATS  # noqa: E402
from loaders.quant.kernels.dequant import dequantize_cuda  # noqa: E402
from loaders.quant.kernels.tiles import Tile  # noqa: E402

# Byte offsets of each type's f16 scales, set to small finite values (random bytes could be inf/NaN).
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q2_K: (80, 82),
              T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}


def random_blocks(qtype: T, n_blocks: int, device: str = "cuda", scale: float = 0.01,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random block bytes with finite f16 scales in [0, ``scale``)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (n_blocks, type_size), dtype=torch.uint8, device=device, generator=generator)
    scale = (torch.rand(n_blocks, device=device, generator=generator) * scale).to(torch.float16)
    scale = scale.view(torch.uint8).reshape(n_blocks, 2)
    for off in F16_FIELDS[qtype]:
        blocks[:, off:off + 2] = scale
    return blocks


def sweep(qtype: T, blocks: torch.Tensor, shape: tuple[int, int], copy_bw: float) -> None:
    fmt = FORMATS[qtype]
    nsub = fmt.tile.nsub
    results = []
    for per_program in (256, 512, 1024, 2048, 4096, 8192):
        for warps in (2, 4, 8):
            n_blocks = max(1, per_program // fmt.block_size)
            tile = Tile(nsub, n_blocks, warps)
            ms = triton.testing.do_bench(lambda: dequantize_cuda(blocks, fmt, shape, torch.bfloat16, tile),
                                         return_mode="median")
            results.append(((blocks.numel() + 2 * shape[0] * shape[1]) / ms / 1e6 / copy_bw, tile))
    results.sort(key=lambda r: -r[0])
    print(f"  sweep {qtype.name}: " + ", ".join(f"{t.blocks}x{t.num_warps}w {100 * f:.0f}%" for f, t in results[:4]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--types", default="", help="comma-separated type names (default: every kernel type)")
    parser.add_argument("shape", nargs="*", type=int, help="rows cols of the weight")
    a = parser.parse_args()
    do_sweep, args = a.sweep, a.shape
    names = [name.strip() for name in a.types.split(",") if name.strip()]
    unknown = [name for name in names if name not in {f.name for f in KERNEL_FORMATS}]
    if unknown:
        parser.error(f"--types: no kernel for {', '.join(unknown)} (kernel types: "
                     f"{', '.join(f.name for f in KERNEL_FORMATS)})")
    types = [T[name] for name in names] if names else [f.qtype for f in KERNEL_FORMATS]
    rows, cols = (int(args[0]), int(args[1])) if len(args) > 1 else (12288, 3072 * 4)
    n = rows * cols
    src = torch.empty(n * 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_bw = 2 * src.numel() / copy_ms / 1e6
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth (read + write of {src.numel() / 1e9:.2f} GB): {copy_bw:.0f} GB/s")
    print(f"weight {rows}x{cols} ({n / 1e6:.0f}M elements) to bf16\n")
    print("| type | triton ms | GB/s | % of copy | torch path ms | speed-up |")
    print("|---|---|---|---|---|---|")
    worst = 1.0
    for qtype in types:
        qcls = FORMATS[qtype]
        blocks = random_blocks(qtype, n // qcls.block_size)
        ms = triton.testing.do_bench(lambda: dequantize_cuda(blocks, qcls, (rows, cols), torch.bfloat16),
                                     return_mode="median")
        with torch._C.DisableTorchFunctionSubclass():
            torch_ms = triton.testing.do_bench(lambda: qcls.dequantize_blocks(blocks).to(torch.bfloat16),
                                               return_mode="median")
        gbs = (blocks.numel() + 2 * n) / ms / 1e6
        worst = min(worst, gbs / copy_bw)
        print(f"| {qtype.name} | {ms:.3f} | {gbs:.0f} | {100 * gbs / copy_bw:.0f}% | {torch_ms:.3f} | {torch_ms / ms:.1f}x |")
        if do_sweep:
            sweep(qtype, blocks, (rows, cols), copy_bw)
    print(f"\nslowest kernel: {100 * worst:.0f}% of copy bandwidth (target >= 85%)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    np.random.seed(0)
    main()
