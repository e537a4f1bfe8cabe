"""The fp8 compute mode's matmul against bf16, on Qwen-Image's layer shapes. Needs a CUDA GPU with
fp8 tensor cores:

    python bench/fp8_matmul.py

Per shape (rows = tokens of a batch-2 CFG forward: 8192 image tokens at 1024x1024, 13778 at
1328x1328, 192 text tokens, 2 rows of modulation): the median time (triton.testing.do_bench) of
torch.nn.functional.linear in bf16 and of torch._scaled_mm on the same weight as FP8 rows, with
row-wise (Hopper) and tensor-wise (Ada) scales, each with exact and with fast accumulation; the
activation quantization kernel's time and bandwidth (bytes read + written); the whole fp8 layer as the
model runs it (quantization + matmul). The error columns are the relative error (Frobenius norm)
against a float64 matmul of the same fp8 values, exact and fast accumulation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loaders.quant import fp8  # noqa: E402
from loaders.quant.kernels.fp8_act import quantize_activations  # noqa: E402

# (what, rows, out_features, in_features)
SHAPES = [
    ("to_q/k/v, attn out at 1024", 8192, 3072, 3072),
    ("mlp up at 1024", 8192, 12288, 3072),
    ("mlp down at 1024", 8192, 3072, 12288),
    ("to_q/k/v, attn out at 1328", 13778, 3072, 3072),
    ("mlp down at 1328", 13778, 3072, 12288),
    ("text stream", 192, 3072, 3072),
    ("modulation", 2, 18432, 3072),
]


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    print("| layer | rows x out x in | bf16 | fp8 row-wise | row-wise, fast acc. | tensor-wise | tensor-wise, fast "
          "acc. | quantization (GB/s) | fp8 layer | vs bf16 | error exact / fast |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for what, m, n, k in SHAPES:
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        bias = torch.randn(n, device="cuda", generator=g).bfloat16()
        raw = fp8.FP8Rows.encode(w)
        wq, w_scale = fp8.split(raw, (n, k))
        xq, x_scale = quantize_activations(x)
        one = torch.ones((), device="cuda")
        w_bf16 = w.bfloat16()

        def scaled(rowwise: bool, fast: bool):
            a, b = (x_scale, w_scale[None, :]) if rowwise else (one, one)
            return lambda: torch._scaled_mm(xq, wq.t(), scale_a=a, scale_b=b, bias=bias, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)

        t = {"bf16": ms(lambda: torch.nn.functional.linear(x, w_bf16, bias))}
        for rowwise in (True, False):
            for fast in (False, True):
                t[rowwise, fast] = ms(scaled(rowwise, fast))
        t["quant"] = ms(lambda: quantize_activations(x))
        t["layer"] = ms(lambda: fp8.fp8_linear(x, fp8.operands(raw, (n, k)), bias))
        reference = (xq.double() * x_scale.double()) @ fp8.FP8Rows.dequantize(raw, (n, k), torch.float64).T + bias.double()
        errors = [float((scaled(True, fast)().double() - reference).norm() / reference.norm()) for fast in (False, True)]
        gbs = (m * k * 3 + m * 4) / t["quant"] / 1e6
        print(f"| {what} | {m}x{n}x{k} | {t['bf16'] * 1e3:.0f} us | "
              + " | ".join(f"{t[r, f] * 1e3:.0f} us" for r in (True, False) for f in (False, True))
              + f" | {t['quant'] * 1e3:.0f} us ({gbs:.0f}) | {t['layer'] * 1e3:.0f} us | {t['layer'] / t['bf16']:.2f}x | "
              f"{errors[0]:.2e} / {errors[1]:.2e} |")


if __name__ == "__main__":
    main()
