"""Our K-quant encoders against llama.cpp's reference quantizers, compiled from its sources (see
llama_cpp_ref): the same bytes, block for block, on rows that probe the reference's corners."""

from __future__ import annotations

import numpy as np
import pytest

from llama_cpp_ref import quantize_ref, reference
import llama_cpp_ref
from loaders.quant import encode


def rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    normal = rng.standard_normal((256, 256))
    return {
        "normal": normal,
        "zeros": np.zeros((4, 256)),
        "constant positive": np.full((4, 256), 0.7),
        "constant negative": np.full((4, 256), -0.7),
        "all positive": np.abs(normal[:64]),
        "all negative": -np.abs(normal[:64]),
        "ties (quarter steps)": np.round(normal[:128] * 4) / 4,
        "small integers": rng.integers(-8, 8, (128, 256)).astype(float),
        "huge": normal[:64] * 1e4,
        "tiny": normal[:64] * 1e-6,
        "sparse": normal[:128] * (rng.random((128, 256)) < 0.05),
        "outliers": normal[:128] * 0.01 + (rng.random((128, 256)) < 0.01) * 5,
        "a zero sub-block": np.concatenate([np.zeros((64, 32)), normal[:64, 32:]], axis=1),
        "a constant half": np.concatenate([np.full((64, 128), 0.3), normal[:64, 128:]], axis=1),
    }


@pytest.fixture(scope="module")
def lib():
    built = reference()
    if built is None:
        pytest.skip(llama_cpp_ref.why_not)
    return built


@pytest.mark.parametrize("name, encoder", [("q4_K", encode.q4_k), ("q5_K", encode.q5_k), ("q6_K", encode.q6_k)])
@pytest.mark.parametrize("case", list(rows()))
def test_k_quant_bytes_equal_llama_cpp_reference(lib, name, encoder, case):
    x = rows()[case].astype(np.float32)
    expected = quantize_ref(lib, name, x)
    with np.errstate(all="ignore"):
        got = encoder(x)
    assert got.shape == expected.shape
    differ = np.flatnonzero((got != expected).any(axis=1))
    assert differ.size == 0, f"{differ.size} of {len(x)} blocks differ, first {differ[:5]}"
