"""FP8 rows (the fp8 compute mode's weights): the stored values against the float weight, and the fp8
matmuls (CUDA with fp8 tensor cores) against a float64 matmul of the same weight."""

import pytest
import torch

from loaders.quant import fp8
from loaders.quant.plan import quantized_linear
from loaders.quant.weight import dequantize_bytes


def weight(rows=96, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3] *= 1000  # an outlier row: per-row scales keep it from flattening the others
    w[5] = 0  # an all-zero row stays zero
    return w


def test_rows_hold_each_value_to_fp8_precision():
    w = weight()
    raw = fp8.quantize_rows(w)
    assert raw.dtype == torch.uint8 and raw.numel() == w.numel() + 4 * w.shape[0]
    q, scale = fp8.split(raw, w.shape)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and q.shape == w.shape
    torch.testing.assert_close(scale, w.abs().amax(dim=1).clamp(min=fp8.MIN_AMAX) / fp8.FP8_MAX)
    back = dequantize_bytes(raw, fp8.FP8Rows, w.shape, torch.float32)
    # e4m3: 3 mantissa bits, a relative step of 1/8 (error <= 1/16); below 2^-6 the subnormal step 2^-9.
    bound = torch.maximum(w.abs() / 16, 2.0 ** -10 * scale[:, None]) * 1.0001
    assert ((back - w).abs() <= bound).all()
    assert (back[5] == 0).all()
    # Rows other than the outlier keep their own precision.
    assert ((back[4] - w[4]).abs().max() / w[4].abs().max()) < 1 / 16


def test_linear_without_fp8_tensor_cores_uses_the_dequantized_weight():
    w = weight()
    raw = fp8.quantize_rows(w)
    x = torch.randn(7, w.shape[1])
    bias = torch.randn(w.shape[0])
    expected = torch.nn.functional.linear(x, fp8.FP8Rows.dequantize(raw, w.shape, torch.float32), bias)
    torch.testing.assert_close(quantized_linear(x, raw, fp8.FP8Rows, w.shape, bias), expected)


def test_matmul_operands_view_the_bytes_where_they_lie():
    w = weight(96, 160)
    raw = fp8.quantize_rows(w)
    q, scale = fp8.split(raw, w.shape)
    # Bytes as ComfyUI's loaders hand them over: a slice of a larger buffer (storage offset).
    lying = torch.cat([torch.full((48,), 7, dtype=torch.uint8), raw])[48:]
    ops = fp8.operands(lying, w.shape)
    assert ops.values_t.shape == (160, 96) and ops.values_t.stride() == (1, 160) and ops.scales.shape == (1, 96)
    assert ops.values_t.data_ptr() == lying.data_ptr() and ops.path is None
    assert torch.equal(ops.values_t.t().view(torch.uint8), q.view(torch.uint8)) and torch.equal(ops.scales[0], scale)
    torch.testing.assert_close(fp8.dequantize_weight(ops, torch.float32), q.float() * scale[:, None], rtol=0, atol=0)


def test_layers_of_a_group_share_one_quantization_of_the_same_input(monkeypatch):
    calls = []
    monkeypatch.setattr(fp8, "quantize_input", lambda x, w: calls.append(x) or (object(), object()))
    shared = fp8.SharedInput()
    x, y = torch.zeros(2), torch.zeros(2)
    first = shared.quantize(x, None, last=False)
    assert shared.quantize(x, None, last=False) is first and shared.quantize(x, None, last=True) is first
    assert calls == [x]
    # After the group's last layer nothing is held, and the next input is quantized anew.
    assert shared.source is None and shared.quantized is None
    again = shared.quantize(x, None, last=False)
    assert again is not first and len(calls) == 2
    # Another tensor (even with equal values) is never taken for the held one.
    assert shared.quantize(y, None, last=False) is not again and calls[-1] is y


def test_group_lets_go_when_its_last_layer_takes_another_path():
    # The last member (a LoRA-patched v projection, or an fp32 input) takes no fp8 matmul: what the
    # earlier members quantized must not stay held on the GPU until the next step.
    w = weight(32, 64)
    ops = fp8.operands(fp8.quantize_rows(w), w.shape)._replace(path="rowwise")
    shared = fp8.SharedInput()
    x = torch.randn(3, 64)
    shared.source, shared.quantized = x, (object(), object())
    out = fp8.fp8_linear(x, ops, None, shared, last=True)  # fp32 input: the dequantized weight
    torch.testing.assert_close(out, x @ fp8.dequantize_weight(ops, torch.float32).T)
    assert shared.source is None and shared.quantized is None
    shared.source = x
    fp8.fp8_linear(x, ops, None, shared, last=False)
    assert shared.source is x  # an earlier member leaves it for the later ones


def test_only_matrices_of_multiples_of_16_are_held():
    assert fp8.can_hold((3072, 64)) and not fp8.can_hold((3072, 40)) and not fp8.can_hold((64,))


fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="fp8 matmuls need a CUDA GPU with fp8 tensor cores (compute capability 8.9+)")


@fp8_gpu
@pytest.mark.parametrize("path", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_fp8_matmul_matches_float_matmul(path, rows):
    if path == "rowwise" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise scaled fp8 matmuls need Hopper or later")
    w = weight(256, 512).cuda()
    raw = fp8.quantize_rows(w)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 512, generator=g).bfloat16().cuda()
    bias = torch.randn(256, generator=g).bfloat16().cuda()
    got = fp8.fp8_linear(x, fp8.operands(raw, w.shape)._replace(path=path), bias)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 256)
    expected = x.double() @ w.double().T + bias.double()
    # Each output's error in units of its dot product's natural size, |x| |w_row| / sqrt(in): weights
    # and activations each carry fp8 rounding (<= 1/16 relative per value, about 2.5% rms, random in
    # sign). A float64 emulation of the same rounding gives at most 4.1% rms over 200 seeds
    # (3.0% against the same fp8 weight in float, where only the activations' rounding remains).
    assert dot_error(got, expected, x, w) < 0.06
    ref = x.double() @ fp8.FP8Rows.dequantize(raw, w.shape, torch.float64).T + bias.double()
    assert dot_error(got, ref, x, w) < 0.045


def dot_error(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """RMS error of ``x @ w.T`` outputs, each relative to |x row| |w row| / sqrt(in) (zero rows skipped)."""
    size = x.double().norm(dim=-1, keepdim=True) * w.double().norm(dim=1) / w.shape[1] ** 0.5
    keep = size > 0
    return ((got.double() - expected)[keep] / size[keep]).pow(2).mean().sqrt().item()


@fp8_gpu
def test_layer_entry_point_takes_the_fp8_matmul_for_bf16_and_float_for_fp32():
    w = weight(256, 512).cuda()
    raw = fp8.quantize_rows(w)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0)).cuda()
    exact = torch.nn.functional.linear(x, fp8.FP8Rows.dequantize(raw, w.shape, torch.float32))
    torch.testing.assert_close(quantized_linear(x, raw, fp8.FP8Rows, w.shape), exact)
    fast = quantized_linear(x.bfloat16(), raw, fp8.FP8Rows, w.shape)
    assert fast.dtype == torch.bfloat16 and 0 < dot_error(fast, exact.double(), x, w) < 0.045


@fp8_gpu
@pytest.mark.parametrize("cols", [3072, 12288, 18944])  # one pass (held in registers), and two
@pytest.mark.parametrize("per_row", [True, False])
def test_activation_quantization_equals_torch_rounding(cols, per_row):
    # Only on the GPU: Triton's interpreter converts to fp8 by its own (wrong) rounding.
    from loaders.quant.kernels.fp8_act import quantize_activations
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(33, cols, generator=g) * 3).cuda()
    x[7] *= 1000  # an outlier row
    x[9] = 0
    padded = torch.nn.functional.pad(x.bfloat16(), (1, 0))
    # Aligned rows, then the same launch key but for rows starting 2 bytes off 16 (which Triton
    # compiles apart): the direct launches of kernels/launch.py must keep the two kernels apart.
    for x in (padded[:, 1:].contiguous(), padded[:, 1:].contiguous(), padded[:, 1:]):
        q, scale = quantize_activations(x, per_row=per_row)
        amax = x.float().abs().amax(dim=1, keepdim=True) if per_row else x.float().abs().amax()
        expected_scale = amax.clamp(min=fp8.MIN_AMAX) / fp8.FP8_MAX
        assert scale.shape == expected_scale.shape and torch.equal(scale, expected_scale)
        expected = (x.float() * (1.0 / expected_scale)).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
        assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
