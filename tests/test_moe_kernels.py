"""MoE kernels (grouped GEMM, permute / unpermute, weighted activation) vs their pure-torch references.

The Triton kernels run on CPU tensors under Triton's interpreter (tests/conftest.py turns it on where
there is no GPU; on a GPU machine tests/gpu/test_moe_gpu.py runs them instead). The interpreter
computes bf16 wrongly, so it is tested in fp32 and fp16 here and in bf16 on the GPU. Tolerances:
fp32 1e-5 relative, fp16 2e-3 relative (max abs error over the max abs reference value).
"""

import pytest
import torch

from sparta.kernels.grouped_gemm import grouped_mm
from sparta.kernels.moe_permute import permute, unpermute, weighted_activation
from sparta.kernels.moe_reference import grouped_mm_reference
from sparta.moe.dispatch import build_plan_from_mask

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU interpreter tests; tests/gpu/test_moe_gpu.py runs these kernels on CUDA")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def assert_close(actual, expected, dtype, what):
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-12
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g} ({dtype})"


def random_plan(num_tokens, slots, num_experts, generator, padded):
    """A routing plan built the way `sparta.moe.dispatch` builds it, with some unused slots (-1);
    padded: one row per slot, the rows of unused slots at the end as padding (row_token -1)."""
    slot_expert = torch.randint(-1, num_experts, (num_tokens, slots), generator=generator)
    flat = slot_expert.flatten()
    key = torch.where(flat >= 0, flat, num_experts)
    _, order = torch.sort(key, stable=True)
    real = int((flat >= 0).sum())
    token_pos = torch.full((num_tokens * slots,), -1, dtype=torch.int32)
    token_pos[order[:real]] = torch.arange(real, dtype=torch.int32)
    row_token = (order // slots).to(torch.int32)
    row_token[real:] = -1
    return row_token if padded else row_token[:real], token_pos.view(num_tokens, slots), real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts", [[10, 0, 30, 30], [0, 0, 17], [64]])
def test_triton_grouped_mm_matches_loop(dtype, counts):
    g = torch.Generator().manual_seed(len(counts))
    K, N = 48, 40
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), K, generator=g).to(dtype).requires_grad_()
    w_storage = torch.randn(len(counts), N, K, generator=g).to(dtype).requires_grad_()  # [G, N, K]
    grad_out = torch.randn(sum(counts), N, generator=g).to(dtype)

    out = grouped_mm(x, w_storage.transpose(1, 2), offs, impl="triton")
    out.backward(grad_out)
    x_ref, w_ref = x.detach().float().requires_grad_(), w_storage.detach().float().requires_grad_()
    ref = grouped_mm_reference(x_ref, w_ref.transpose(1, 2), offs)
    ref.backward(grad_out.float())

    assert_close(out, ref, dtype, "out")
    assert_close(x.grad, x_ref.grad, dtype, "dx")
    assert_close(w_storage.grad, w_ref.grad, dtype, "dw")


def test_triton_grouped_mm_rows_past_last_offset_are_zero():
    x = torch.randn(20, 16)
    w = torch.randn(2, 16, 32)
    offs = torch.tensor([5, 12], dtype=torch.int32)
    out = grouped_mm(x, w, offs, impl="triton")
    assert_close(out[:12], grouped_mm_reference(x, w, offs)[:12], torch.float32, "out")
    assert torch.equal(out[12:], torch.zeros(8, 32))


def test_torch_grouped_mm_matches_loop_on_cpu():
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([3, 3, 20], dtype=torch.int32)
    x = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(3, 24, 16, generator=g, requires_grad=True)
    grad_out = torch.randn(20, 24, generator=g)
    out = grouped_mm(x, w.transpose(1, 2), offs, impl="torch")
    out.backward(grad_out)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_mm_reference(x_ref, w_ref.transpose(1, 2), offs).backward(grad_out)
    assert_close(out, grouped_mm_reference(x, w.transpose(1, 2), offs), torch.float32, "out")
    assert_close(x.grad, x_ref.grad, torch.float32, "dx")
    assert_close(w.grad, w_ref.grad, torch.float32, "dw")


def test_grouped_mm_rejects_bad_inputs():
    x, w = torch.randn(8, 16), torch.randn(2, 16, 4)
    with pytest.raises(ValueError, match="offs must be int32"):
        grouped_mm(x, w, torch.tensor([4, 8]))
    with pytest.raises(ValueError, match="K=12"):
        grouped_mm(torch.randn(8, 12), w, torch.tensor([4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_mm(x, w, torch.tensor([4, 8], dtype=torch.int32), impl="cutlass")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_permute_unpermute_match_reference(dtype, padded):
    g = torch.Generator().manual_seed(1)
    num_tokens, slots, width = 37, 3, 40
    row_token, token_pos, real = random_plan(num_tokens, slots, 5, g, padded)
    x = torch.randn(num_tokens, width, generator=g).to(dtype)
    row_scale = torch.randn(row_token.shape[0], 1, generator=g).to(dtype)
    row_scale[real:] = float("nan")  # padding rows must never be read
    grad_y = torch.randn(num_tokens, width, generator=g).to(dtype)

    results = {}
    for use_triton in (True, False):
        x_in = x.clone().requires_grad_()
        rows = permute(x_in, row_token, token_pos, use_triton=use_triton)
        y = unpermute(rows * row_scale, row_token, token_pos, use_triton=use_triton)
        y.backward(grad_y)
        results[use_triton] = (rows[:real], y, x_in.grad)
    for what, fast, ref in zip(("rows", "y", "dx"), results[True], results[False]):
        assert_close(fast, ref, dtype, what)
    assert torch.equal(results[True][0], x[row_token[:real].long()])


def test_triton_unpermute_with_mask_plan_stops_at_each_blocks_last_row():
    """BlockFFN's plan lists each token's rows first; the sum loops only up to the last used slot of
    its token block. Width 2048 makes blocks of 32 tokens here: block 0 has no active expert,
    block 1 few, block 2 about half of the experts, block 3 all of them."""
    g = torch.Generator().manual_seed(3)
    num_tokens, experts, width = 128, 8, 2048
    density = torch.tensor([0.0, 0.1, 0.5, 1.0]).repeat_interleave(32)[:, None]
    active = torch.rand(num_tokens, experts, generator=g) < density
    plan = build_plan_from_mask(active, torch.rand(num_tokens, experts, generator=g))
    x = torch.randn(num_tokens, width, generator=g)
    row_scale = torch.randn(plan.row_token.shape[0], 1, generator=g)
    grad_y = torch.randn(num_tokens, width, generator=g)
    results = {}
    for use_triton in (True, False):
        x_in = x.clone().requires_grad_()
        rows = permute(x_in, plan.row_token, plan.token_pos, use_triton=use_triton)
        y = unpermute(rows * row_scale, plan.row_token, plan.token_pos, use_triton=use_triton)
        y.backward(grad_y)
        results[use_triton] = (y, x_in.grad)
    for what, fast, ref in zip(("y", "dx"), results[True], results[False]):
        assert_close(fast, ref, torch.float32, what)
    assert torch.equal(results[True][0][:32], torch.zeros(32, width))


@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_weighted_activation_matches_reference(activation, dtype):
    """Rows past num_rows hold NaN (as padding rows of a grouped GEMM output may): they must not
    leak into the real rows' outputs or into any gradient."""
    g = torch.Generator().manual_seed(2)
    rows, real, d_ff = 33, 29, 40
    h = torch.randn(rows, 2 * d_ff if activation == "swiglu" else d_ff, generator=g).to(dtype)
    h[real:] = float("nan")
    row_weight = torch.rand(rows, generator=g)
    grad_a = torch.randn(rows, d_ff, generator=g).to(dtype)
    grad_a[real:] = float("nan")
    num_rows = torch.tensor([real], dtype=torch.int32)
    results = {}
    for use_triton in (True, False):
        h_in, w_in = h.clone().requires_grad_(), row_weight.clone().requires_grad_()
        a = weighted_activation(h_in, w_in, activation, num_rows=num_rows, use_triton=use_triton)
        a.backward(grad_a)
        results[use_triton] = (a[:real], h_in.grad[:real], w_in.grad)
    for what, fast, ref in zip(("a", "dh", "dw"), results[True], results[False]):
        assert_close(fast, ref, dtype, what)
    assert torch.equal(results[True][2][real:], torch.zeros(rows - real))
    unpadded = weighted_activation(h[:real], row_weight[:real], activation, use_triton=True)
    assert_close(unpadded, results[False][0], dtype, "a without padding")
