"""A layer's execution plan (loaders.quant.plan) on the CPU: bound once, it gives the dequantize-then-
matmul result; with a model's DeviceCopies it converts its bytes at the first resident call (while
memory allows), runs the copy from then on with the same result, and lets go of it when dropped."""

import gc
import weakref

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from loaders.quant import fp8
from loaders.quant.formats import FORMATS
from loaders.quant.plan import DeviceCopies, FP8Copy, FP8Plan, KernelPlan, LinearPlan, bind

SHAPE = (48, 512)


def q4_k_weight(seed=0):
    g = np.random.default_rng(seed)
    w = (g.standard_normal(SHAPE) * 0.05).astype(np.float32)
    raw = torch.from_numpy(FORMATS[T.Q4_K].encode(w).copy())
    return raw, FORMATS[T.Q4_K].dequantize(raw, SHAPE, torch.float32)


def test_bind_picks_the_torch_path_on_the_cpu_and_fp8_rows_their_own():
    raw, _ = q4_k_weight()
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    assert type(plan) is LinearPlan and plan.shape == SHAPE
    assert type(bind(fp8.FP8Rows, SHAPE, "cpu")) is FP8Plan
    assert not isinstance(plan, KernelPlan)


def test_plan_gives_dequantize_then_matmul_bit_for_bit():
    raw, w = q4_k_weight()
    x, bias = torch.randn(5, SHAPE[1]), torch.randn(SHAPE[0])
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    assert torch.equal(plan(x, raw, bias), torch.nn.functional.linear(x, w, bias))
    assert torch.equal(plan.weight(raw, torch.float32), w)


class Memory:
    """A device whose free memory the test sets."""

    def __init__(self, free):
        self.free, self.asked = free, 0

    def __call__(self, device):
        self.asked += 1
        return self.free


def test_copy_is_made_at_the_first_resident_call_and_gives_the_same_result():
    raw, w = q4_k_weight()
    x, bias = torch.randn(5, SHAPE[1]), torch.randn(SHAPE[0])
    expected = torch.nn.functional.linear(x, w, bias)
    memory = Memory(1 << 30)
    copies = DeviceCopies(fp8=False, dtype=torch.float32, device="cpu", reserve=1 << 20, free_memory=memory)
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    plan.copies = copies
    assert torch.equal(plan(x, raw, bias), expected) and plan.copy is None  # bytes not resident: no copy
    assert torch.equal(plan(x, raw, bias, resident=True), expected)
    copy = plan.copy
    assert copy is not None and copies.holders == [plan] and copies.held == SHAPE[0] * SHAPE[1] * 4
    assert copy.made_from(bias)
    bias.add_(1.0)  # the bias handed over may be memory ComfyUI reuses: the copy holds its own
    assert torch.equal(copy(x), expected)
    # ... and says it no longer matches a bias changed in place (ComfyUI merging a bias patch).
    assert not copy.made_from(bias) and not copy.made_from(bias.clone())
    # It does not keep the bias it was made from alive (that would keep the memory the bias views).
    source = weakref.ref(bias)
    del bias
    gc.collect()
    assert source() is None and not copy.made_from(torch.zeros(SHAPE[0]))
    assert copies.drop() == SHAPE[0] * SHAPE[1] * 4 and plan.copy is None and copies.held == 0


def test_a_call_in_another_dtype_makes_no_copy_and_the_copy_holds_its_bias_in_the_compute_dtype():
    raw, w = q4_k_weight()
    copies = DeviceCopies(fp8=False, dtype=torch.bfloat16, device="cpu", reserve=0, free_memory=Memory(1 << 30))
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    plan.copies = copies
    x, bias = torch.randn(2, SHAPE[1]), torch.randn(SHAPE[0])
    # The NaN guard's fp32 redo: computed from the bytes, no bf16 copy made from an fp32 call.
    assert torch.equal(plan(x, raw, bias, resident=True), torch.nn.functional.linear(x, w, bias))
    assert plan.copy is None and copies.free_memory.asked == 0
    plan(x.bfloat16(), raw, bias, resident=True)
    assert plan.copy.weight.dtype == plan.copy.bias.dtype == torch.bfloat16


def test_no_copy_where_it_would_eat_into_the_reserve():
    raw, w = q4_k_weight()
    x = torch.randn(2, SHAPE[1])
    need = SHAPE[0] * SHAPE[1] * 4
    copies = DeviceCopies(fp8=False, dtype=torch.float32, device="cpu", reserve=1000, free_memory=Memory(need + 999))
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    plan.copies = copies
    assert torch.equal(plan(x, raw, None, resident=True), x @ w.T)
    assert plan.copy is None and copies.held == 0 and copies.free_memory.asked == 1
    copies.free_memory.free = need + 1000
    plan(x, raw, None, resident=True)  # once refused, no layer asks again until the copies are dropped
    assert plan.copy is None and copies.free_memory.asked == 1
    copies.drop()
    plan(x, raw, None, resident=True)
    assert plan.copy is not None and copies.free_memory.asked == 2


def test_fp8_copies_hold_fp8_rows_and_run_them():
    raw, w = q4_k_weight()
    x = torch.randn(3, SHAPE[1]).bfloat16()
    copies = DeviceCopies(fp8=True, dtype=torch.bfloat16, device="cpu", reserve=0, free_memory=Memory(1 << 30))
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    plan.copies = copies
    got = plan(x, raw, None, resident=True)
    assert isinstance(plan.copy, FP8Copy) and copies.held == SHAPE[0] * SHAPE[1]
    rows = fp8.FP8Rows.encode(w)
    assert torch.equal(plan.copy.weight, rows)
    # No fp8 matmul on the CPU: the copy's FP8 rows dequantized, in the input's dtype.
    assert torch.equal(got, torch.nn.functional.linear(x, fp8.FP8Rows.dequantize(rows, SHAPE, torch.bfloat16)))


def test_shapes_fp8_cannot_hold_get_a_dequantized_copy():
    shape = (40, 256)  # 40 rows: not a multiple of 16
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.05
    raw = torch.from_numpy(FORMATS[T.Q8_0].encode(w).copy())
    copies = DeviceCopies(fp8=True, dtype=torch.bfloat16, device="cpu", reserve=0, free_memory=Memory(1 << 30))
    plan = bind(FORMATS[T.Q8_0], shape, "cpu")
    plan.copies = copies
    plan(torch.randn(2, 256).bfloat16(), raw, None, resident=True)
    assert type(plan.copy).__name__ == "Copy" and plan.copy.weight.dtype == torch.bfloat16


def test_the_groups_last_member_lets_go_of_the_shared_quantization_on_the_dequantizing_path():
    raw, _ = q4_k_weight()
    shared = fp8.SharedInput()
    plans = [bind(FORMATS[T.Q4_K], SHAPE, "cpu") for _ in range(3)]
    for i, plan in enumerate(plans):
        plan.share(shared, last=i == 2)
    x = torch.randn(2, SHAPE[1])
    shared.source, shared.quantized = x, (torch.zeros(1), torch.ones(1))  # as an earlier member left it
    plans[0](x, raw)
    assert shared.source is x  # not the last member: the quantization stays for the others
    plans[2](x, raw)
    assert shared.source is None and shared.quantized is None


def test_a_copy_made_in_inference_mode_tells_its_bias_by_identity():
    raw, _ = q4_k_weight()
    copies = DeviceCopies(fp8=False, dtype=torch.float32, device="cpu", reserve=0, free_memory=Memory(1 << 30))
    plan = bind(FORMATS[T.Q4_K], SHAPE, "cpu")
    plan.copies = copies
    with torch.inference_mode():  # as ComfyUI samples: tensors without a version counter
        bias = torch.randn(SHAPE[0])
        plan(torch.randn(2, SHAPE[1]), raw, bias, resident=True)
    assert plan.copy.made_from(bias) and not plan.copy.made_from(bias.clone()) and not plan.copy.made_from(None)
