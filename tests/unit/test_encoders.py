"""Our encoders against llama.cpp's reference quantizers, compiled from its sources (see
llama_cpp_ref): the same bytes, block for block, on rows that probe the reference's corners (ties,
zeros and signed zeros, constant rows, huge and tiny magnitudes)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from llama_cpp_ref import quantize_ref
from loaders.quant.formats import ENCODE_PIECE, FORMATS

REPO = Path(__file__).resolve().parents[2]


TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs"]


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


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("case", list(rows()))
def test_encoder_bytes_equal_llama_cpp_reference(lib, name, case):
    # Each type's encoder as the registry gives it to the GGUF writer.
    x = rows()[case].astype(np.float32)
    expected = quantize_ref(lib, name, x)
    with np.errstate(all="ignore"):
        got = FORMATS[T[name.upper()]].encode(x).reshape(expected.shape)
    differ = np.flatnonzero((got != expected).any(axis=1))
    assert differ.size == 0, f"{differ.size} of {len(expected)} blocks differ, first {differ[:5]}"


def importances() -> dict[str, np.ndarray]:
    """Importance matrices (a value per column of a 256-column row) that probe the weighted searches."""
    rng = np.random.default_rng(5)
    return {
        "mean squares": rng.standard_normal((64, 256)).var(axis=0) * rng.pareto(1.0, 256),
        "some columns unused": (rng.random(256) < 0.5) * rng.random(256) * 4,
        "all zero": np.zeros(256),
        "uniform": np.ones(256),
        "huge": rng.random(256) * 1e6,
        "tiny": rng.random(256) * 1e-8,
    }


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("case", list(rows()))
def test_weighted_encoder_bytes_equal_llama_cpp_with_an_importance_matrix(lib, name, case):
    # quantize_<type>(..., imatrix): llama.cpp's weighted searches (_impl), not its reference path.
    x = rows()[case].astype(np.float32)
    importance = importances()["mean squares"].astype(np.float32)
    expected = quantize_ref(lib, name, x, importance)
    with np.errstate(all="ignore"):
        got = FORMATS[T[name.upper()]].encode(x, importance).reshape(expected.shape)
    differ = np.flatnonzero((got != expected).any(axis=1))
    assert differ.size == 0, f"{differ.size} of {len(expected)} blocks differ, first {differ[:5]}"


@pytest.mark.parametrize("name", TYPES)
def test_every_importance_matrix_gives_llama_cpp_bytes_and_one_changes_them(lib, name):
    x = rows()["normal"].astype(np.float32)
    fmt = FORMATS[T[name.upper()]]
    for case, importance in importances().items():
        importance = importance.astype(np.float32)
        expected = quantize_ref(lib, name, x, importance)
        assert np.array_equal(fmt.encode(x, importance).reshape(expected.shape), expected), case
    # Q8_0 has no search to weight: llama.cpp ignores the matrix for it, and so do we.
    weighted = fmt.encode(x, importances()["mean squares"].astype(np.float32))
    assert np.array_equal(weighted, fmt.encode(x)) == (name == "q8_0")


def test_an_importance_matrix_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="128 columns for rows of 256"):
        FORMATS[T.Q4_K].encode(np.ones((2, 256), np.float32), np.ones(128, np.float32))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q6_K, T.IQ4_XS])
def test_encoders_refuse_rows_of_partial_blocks(qtype):
    fmt = FORMATS[qtype]
    with pytest.raises(ValueError, match="whole"):
        fmt.encode(np.ones((2, fmt.block_size + 16), np.float32))


@pytest.mark.parametrize("name", ["q4_0", "q4_K", "q6_K", "iq4_xs"])
def test_a_tensor_of_many_pieces_encodes_as_one_call_of_the_reference(lib, name):
    # Large tensors are encoded in pieces on several threads: the pieces must join into the same bytes.
    fmt = FORMATS[T[name.upper()]]
    x = np.random.default_rng(7).standard_normal((40, 78592)).astype(np.float32)
    assert x.size > 8 * ENCODE_PIECE
    expected = quantize_ref(lib, name, x)
    assert np.array_equal(fmt.encode(x).reshape(expected.shape), expected)
    # With an importance matrix the pieces carry their search weights along.
    importance = np.random.default_rng(8).random(x.shape[-1]).astype(np.float32)
    expected = quantize_ref(lib, name, x[:12], importance)
    assert np.array_equal(fmt.encode(x[:12], importance).reshape(expected.shape), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
def test_encoders_on_the_gpu_give_the_reference_bytes(lib, name, weighted):
    # The same torch code on CUDA: its divisions, square roots and sums must round as the CPU's do.
    x = np.concatenate([rows()[case] for case in ("normal", "zeros", "ties (quarter steps)", "huge", "tiny", "outliers")])
    x = x.astype(np.float32)
    importance = importances()["mean squares"].astype(np.float32) if weighted else None
    expected = quantize_ref(lib, name, x, importance)
    got = FORMATS[T[name.upper()]].encode(torch.from_numpy(x).cuda(), importance).cpu().numpy()
    assert np.array_equal(got.reshape(expected.shape), expected)


SEQ_SUM_CHECK = """
import numpy as np, torch
from loaders.quant.kernels.seq_sum import seq_sum
rng = np.random.default_rng(3)
for n in (16, 32):
    # Magnitudes over many decades: the order of the additions shows in the rounding.
    terms = torch.from_numpy((rng.standard_normal((1000, n)) * 10.0 ** rng.integers(-6, 7, (1000, n))).astype(np.float32))
    in_order = terms[:, 0].clone()
    for i in range(1, n):
        in_order = in_order + terms[:, i]
    assert not torch.equal(terms.sum(-1), in_order), "a reordered sum rounds otherwise on these rows"
    assert torch.equal(seq_sum(terms), in_order), n
    assert seq_sum(terms[:0]).shape == (0,)
try:
    seq_sum(torch.empty(3, 0))
except ValueError:
    print("in order")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_gpu_sum_kernel_adds_in_order():
    # Under Triton's interpreter on the CPU (on a GPU the encoder test above covers it).
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SEQ_SUM_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "in order" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
