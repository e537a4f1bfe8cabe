"""Every supported quant type dequantizes exactly as the gguf package's numpy reference."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from loaders.quant.formats import FORMATS, KERNEL_FORMATS
from loaders.quant.weight import GGMLTensor, dequantize

# Byte offsets of each type's f16 scale fields: random bytes there could be inf/NaN, so they are
# overwritten with small finite values, as real files hold.
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype.name]:
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_every_required_type_is_registered_with_a_kernel():
    assert set(F16_FIELDS) == {q.name for q in FORMATS} == {f.name for f in KERNEL_FORMATS}


@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_dequantize_matches_gguf_reference(name):
    qtype = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = 6, block_size * 4
    blocks = random_blocks(qtype, rows * 4)
    expected = quants.dequantize(blocks.reshape(rows, -1), qtype)
    t = GGMLTensor(torch.from_numpy(blocks.copy()), qtype, (rows, cols))
    got = dequantize(t, torch.float32)
    assert got.shape == (rows, cols)
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "IQ4_XS"])
def test_float_conversion_dequantizes_and_moves_keep_bytes(name):
    qtype = GGMLQuantizationType[name]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, 8, seed=3)
    t = GGMLTensor(torch.from_numpy(blocks.copy()), qtype, (2, block_size * 4))
    expected = quants.dequantize(blocks.reshape(2, -1), qtype)
    np.testing.assert_array_equal(t.to(torch.float32).numpy(), expected)
    np.testing.assert_array_equal(t.float().numpy(), expected)
    assert t.to(dtype=torch.bfloat16).dtype == torch.bfloat16
    for moved in (t.to("cpu"), t.clone(), t.detach(), t.data, torch.nn.Parameter(t, requires_grad=False)):
        assert isinstance(moved, GGMLTensor) and moved.fmt is FORMATS[qtype] and moved.qshape == t.qshape
    assert t.numel() * t.element_size() == blocks.nbytes


# The kernels run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, which must be
# set before Triton is imported: test_triton_kernels_in_interpreter runs this test in a subprocess so).
# The interpreter rounds fp32 to bf16 by truncation, unlike the GPU, so there only fp32 is compared.
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
KERNEL_DTYPES = [torch.float32] if KERNEL_DEVICE == "cpu" else [torch.bfloat16, torch.float32]
needs_kernel_device = pytest.mark.skipif(KERNEL_DEVICE == "cuda" and not torch.cuda.is_available(),
                                         reason="the Triton kernels need a CUDA GPU")


# Every GPU's tiles, whatever the GPU here: tiles change how blocks are split, never a value.
TILE_TABLES = ["default"] + sorted({gpu for f in KERNEL_FORMATS for gpu in f.gpu_tiles})


def tile(fmt, gpu: str):
    return fmt.tile_for(None if gpu == "default" else gpu)


@needs_kernel_device
@pytest.mark.parametrize("name", sorted(F16_FIELDS))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tiles", sorted(TILE_TABLES))
def test_triton_kernel_equals_torch_path_bit_for_bit(name, dtype, tiles):
    from loaders.quant.kernels import dequant
    qtype = GGMLQuantizationType[name]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    # 37 rows of 9 blocks: the block count is no multiple of any program's tile, so the masks matter.
    rows, cols = 37, block_size * 9
    blocks = torch.from_numpy(random_blocks(qtype, rows * 9, seed=11)).to(KERNEL_DEVICE)
    t = GGMLTensor(blocks, qtype, (rows, cols))
    cls = FORMATS[qtype]
    got = dequant.dequantize_cuda(t.contiguous(), cls, (rows, cols), dtype, tile(cls, tiles))
    with torch._C.DisableTorchFunctionSubclass():
        expected = cls.dequantize_blocks(blocks.reshape(-1, cls.type_size)).reshape(rows, cols).to(dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), expected.view(bits))
    if KERNEL_DEVICE == "cuda":
        assert torch.equal(dequantize(t, dtype), got)


@needs_kernel_device
@pytest.mark.skipif(KERNEL_DEVICE == "cpu", reason="the interpreter reads any address; a GPU's 2- and 8-byte loads do not")
@pytest.mark.parametrize("name", sorted(F16_FIELDS))
# 1, 2 and 4: copied by aligned() where the type's loads need that alignment; 8: read in place, by the kernels Triton specialises for blocks
# that are not 16-byte aligned (IQ4_XS then cannot load four words at once).
@pytest.mark.parametrize("shift", (1, 2, 4, 8))
def test_kernels_read_blocks_at_any_offset_from_a_16_byte_boundary(name, shift):
    from loaders.quant.kernels import dequant, matmul
    qtype = GGMLQuantizationType[name]
    fmt = FORMATS[qtype]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rows, cols = 37, block_size * 9
    blocks = torch.from_numpy(random_blocks(qtype, rows * 9, seed=3)).to(KERNEL_DEVICE).reshape(rows, -1)
    buffer = torch.zeros(blocks.numel() + shift, dtype=torch.uint8, device=KERNEL_DEVICE)
    shifted = buffer[shift:].view(rows, -1)
    shifted.copy_(blocks)
    assert shifted.data_ptr() % 16 == shift
    expected = dequant.dequantize_cuda(blocks, fmt, (rows, cols), torch.float32)
    got = dequant.dequantize_cuda(shifted, fmt, (rows, cols), torch.float32)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    x = torch.randn(3, cols, device=KERNEL_DEVICE)
    assert torch.equal(matmul.fused_linear(x, shifted, fmt, (rows, cols)),
                       matmul.fused_linear(x, blocks, fmt, (rows, cols)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_blocks_off_an_8_byte_boundary_are_copied_once_said(caplog):
    from loaders.quant.kernels import dequant
    buffer = torch.arange(64, dtype=torch.uint8)
    assert dequant.aligned(buffer) is buffer
    assert dequant.aligned(buffer[2:], 2) is not buffer and dequant.aligned(buffer[2:], 2).data_ptr() == buffer[2:].data_ptr()
    dequant._warn_misaligned.cache_clear()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            copy = dequant.aligned(buffer[3:])
            assert copy.data_ptr() % 8 == 0 and torch.equal(copy, buffer[3:])
    assert sum("off the alignment" in r.getMessage() for r in caplog.records) == 1


INTERPRETED_FUSED_ROWS = (1, 19)  # the interpreter is slow
FUSED_ROWS = INTERPRETED_FUSED_ROWS if KERNEL_DEVICE == "cpu" else (1, 19, 40, 300)


@needs_kernel_device
@pytest.mark.parametrize("name", sorted(F16_FIELDS))
@pytest.mark.parametrize("rows", FUSED_ROWS)
def test_fused_matmul_equals_dequantize_then_matmul(name, rows):
    from loaders.quant.kernels import matmul
    qtype = GGMLQuantizationType[name]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    # 70 output features (two column tiles, the second partly masked); 12 blocks per row: the
    # 32-element types take 4 per step, the others one.
    n, k = 70, block_size * 12
    blocks = torch.from_numpy(random_blocks(qtype, n * 12, seed=5)).to(KERNEL_DEVICE)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=g).to(KERNEL_DEVICE)
    cls = FORMATS[qtype]
    w = cls.dequantize_blocks(blocks.reshape(-1, cls.type_size)).reshape(n, k)
    expected = (x.double() @ w.double().T + bias.double())
    for dtype, tol in [(torch.float32, 1e-5)] + ([(torch.bfloat16, 1e-2)] if KERNEL_DEVICE == "cuda" else []):
        for split in (1, 2):  # whole rows per program, and K split between two (partial sums added)
            got = matmul.fused_linear(x.to(dtype), blocks.reshape(n, -1), cls, (n, k), bias.to(dtype), split=split)
            assert got.dtype == dtype and got.shape == (rows, n)
            err = (got.double() - expected).abs().max() / expected.abs().max()
            assert err < tol, (dtype, split, err)
            # A batch of sequences (a layer's usual input) gives the same rows in its own shape.
            batched = matmul.fused_linear(x.to(dtype).unsqueeze(0), blocks.reshape(n, -1), cls, (n, k), bias.to(dtype),
                                          split=split)
            assert batched.shape == (1, rows, n) and torch.equal(batched[0], got)
    if KERNEL_DEVICE == "cuda":
        # A layer's plan, with the kernel forced either way: the same result.
        from loaders.quant.plan import bind
        for choice in ("on", "off"):
            plan = bind(cls, (n, k), KERNEL_DEVICE, fused=choice)
            assert plan.fused_rows == (0 if choice == "off" else 512)
            got = plan(x.bfloat16()[None], blocks.reshape(n, -1), bias.bfloat16())
            assert got.shape == (1, rows, n)
            assert (got[0].double() - expected).abs().max() / expected.abs().max() < 1e-2


def fp8_test_weight(name: str, edges: dict[int, int], seed: int):
    """37 rows of 9 random blocks of type ``name`` on the kernels' device (no multiple of a program's
    blocks), with the rows of ``edges`` given that f16 scale throughout; the format, the bytes
    ``[rows, bytes]`` and the torch path's fp32 weight."""
    qtype = GGMLQuantizationType[name]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rows, cols = 37, block_size * 9
    blocks = random_blocks(qtype, rows * 9, seed=seed).reshape(rows, 9, -1)
    for row, half in edges.items():
        for off in F16_FIELDS[name]:
            blocks[row, :, off:off + 2] = np.array([half], dtype=np.uint16).view(np.uint8)
    blocks = torch.from_numpy(blocks.reshape(rows, -1)).to(KERNEL_DEVICE)
    cls = FORMATS[qtype]
    with torch._C.DisableTorchFunctionSubclass():
        w = cls.dequantize_blocks(blocks.reshape(-1, cls.type_size)).reshape(rows, cols).float()
    return cls, blocks, w


@needs_kernel_device
@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_fp8_rows_decoded_from_blocks_are_the_fp8_modes_bytes(name):
    # The fp8-on-the-fly mode's weight: the bytes quantize_rows makes of the dequantized weight (the fp8
    # compute mode's), the rows' scales given.
    from loaders.quant.fp8 import FP8, quantize_rows, split
    from loaders.quant.kernels.fp8_rows import decode_fp8_rows
    # The rounding's edges: a row of zeros (scales +0) and one of signed zeros (scales -0); random
    # values give many that round up into the next power of two. And a damaged row (an infinite
    # scale): NaN throughout, as quantize_rows leaves it.
    cls, blocks, w = fp8_test_weight(name, {3: 0x0000, 4: 0x8000, 5: 0x7C00}, seed=13)
    assert not w[3].any() and not w[4].any() and not w[5].isfinite().all()
    want_values, scales = split(quantize_rows(w), w.shape)
    got = decode_fp8_rows(blocks, cls, w.shape, scales.clone())
    assert got.dtype == FP8 and got.shape == w.shape
    # A NaN's sign is not defined: NaN where the reference has NaN, every other byte the same.
    nan = want_values.float().isnan()
    assert nan[5].all() and torch.equal(got.float().isnan(), nan)
    assert torch.equal(got.view(torch.uint8)[~nan], want_values.view(torch.uint8)[~nan])


@needs_kernel_device
@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_fp8_row_scales_found_a_few_rows_at_a_time_are_quantize_rows(name):
    # fp8 on the fly's scales, from the dequant kernel 16 rows at a time (37 rows: a short last slice),
    # equal those of the whole weight in fp32, zero, signed-zero and damaged rows included.
    from loaders.quant.fp8 import quantize_rows, row_scales, split
    from loaders.quant.kernels.dequant import dequantize_cuda
    cls, blocks, w = fp8_test_weight(name, {3: 0x0000, 20: 0x8000, 36: 0x7C00}, seed=17)
    _, want = split(quantize_rows(w), w.shape)
    got = row_scales(blocks.reshape(-1), w.shape,
                     lambda raw, shape: dequantize_cuda(raw, cls, shape, torch.float32), chunk=16 * w.shape[1])
    assert not got[36].isfinite() and got[3] == got[20] == want[3]
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(KERNEL_DEVICE == "cpu", reason="already under the interpreter")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels are tested on the GPU itself")
def test_triton_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "test_triton_kernel_equals_torch_path_bit_for_bit or test_fused_matmul or fp8_rows"
                        " or fp8_row_scales"],
                       cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
    expected = len(F16_FIELDS) * (len(TILE_TABLES) + len(INTERPRETED_FUSED_ROWS) + 2)
    assert r.returncode == 0 and f"{expected} passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_gpu_tiles_keep_each_types_sub_block_split():
    # The sweeps vary blocks per program and warps: each type's sub-block split is the same on every GPU.
    for fmt in KERNEL_FORMATS:
        assert all(t.nsub == fmt.tile.nsub for t in fmt.gpu_tiles.values()), fmt.name
    assert FORMATS[GGMLQuantizationType.Q5_K].tile_for(None) is FORMATS[GGMLQuantizationType.Q5_K].tile


def test_gpu_tiles_are_chosen_by_a_whole_word_of_the_gpu_name():
    q5_k = FORMATS[GGMLQuantizationType.Q5_K]
    assert q5_k.tile_for("NVIDIA H200") is q5_k.gpu_tiles["H200"] != q5_k.tile
    assert q5_k.tile_for("NVIDIA GH200 480GB") is q5_k.tile and q5_k.tile_for("NVIDIA H100 80GB HBM3") is q5_k.tile


def test_an_unknown_fused_setting_is_said_and_read_as_auto(caplog):
    from loaders.quant.plan import fused_choice
    assert fused_choice("off") == "off" and fused_choice("on") == "on"
    with caplog.at_level("WARNING"):
        assert fused_choice("yes") == "auto"
    assert "QWEN_GGUF_FUSED='yes'" in caplog.text and "auto, on, off" in caplog.text


def test_the_fused_kernel_is_picked_for_few_rows_except_iq4_nl():
    from loaders.quant.plan import FUSED_MAX_ROWS, fused_rows
    F = {q.name: f for q, f in FORMATS.items()}
    modulation, q_proj = (18432, 3072), (3584, 3584)
    assert fused_rows(F["Q4_K"], modulation, "auto") == fused_rows(F["IQ4_XS"], modulation, "auto") == FUSED_MAX_ROWS == 16
    assert fused_rows(F["Q4_K"], q_proj, "auto") == 16
    assert fused_rows(F["IQ4_NL"], modulation, "auto") == 0
    assert fused_rows(F["IQ4_NL"], modulation, "on") == 512
    assert fused_rows(F["Q4_K"], modulation, "off") == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_only_large_weights_split_the_fused_kernels_rows(monkeypatch):
    # Splitting K costs two more launches (zeroing, casting): worth it only where the kernel is long.
    from loaders.quant.kernels import matmul
    from loaders.quant.plan import FUSED_SPLIT_ELEMENTS
    monkeypatch.setattr(matmul, "_multiprocessors", lambda device: 132)
    q4_k = FORMATS[GGMLQuantizationType.Q4_K]
    for shape, may_split, split in [((3584, 18944), True, 4), ((3584, 3584), False, 1)]:
        assert (shape[0] * shape[1] >= FUSED_SPLIT_ELEMENTS) == may_split
        fused = matmul.FusedMatmul(q4_k, shape, torch.device("cuda"), may_split=may_split)
        launch, chosen, grid = fused.bound[16, False, torch.bfloat16]
        assert chosen == split and grid == (shape[0] // 32, 1, split)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_bandwidth_bench_names_a_type_without_a_kernel():
    bench = Path(__file__).resolve().parents[2] / "bench" / "dequant_bandwidth.py"
    r = subprocess.run([sys.executable, str(bench), "--types", "Q3_K, F16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no kernel for F16" in r.stderr and "IQ4_XS" in r.stderr, r.stderr[-2000:]
