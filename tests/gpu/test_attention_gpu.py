"""sparta.attention on the GPU: plan groups and the module through the compiled Triton kernel (bf16,
forward and backward) against the fp32 reference, and selection without host synchronisation."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from sparta.attention import DynamicBlockSelection, Pattern, Plan, SparseAttention, SparseDSchedule, VideoGrid, attend  # noqa: E402

DEVICE = "cuda"
GRID = VideoGrid(3, 16, 20, text=40)  # 1000 tokens: blocks of 128 with a short last one


def relative_error(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def test_plan_groups_on_the_kernel_match_the_reference_forward_and_backward():
    patterns = [Pattern.of("tiles", tile=(1, 8, 16), window=(3, 1, 1)), Pattern.of("diagonal", width=300),
                Pattern.of("full"), Pattern.of("skip"), Pattern.of("temporal", width=20),
                Pattern.of("stripe", keys=((0, 40), (500, 700))), Pattern.of("spatial", frame_radius=0),
                Pattern.of("tiles", tile=(1, 8, 16), window=(1, 3, 3))]
    plan = Plan(GRID, 128, {0: patterns})
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(2, 8, GRID.tokens, 128, device=DEVICE, generator=generator)
    k, v = (torch.randn(2, 4, GRID.tokens, 128, device=DEVICE, generator=generator) for _ in range(2))  # GQA
    q16, k16, v16 = (x.bfloat16().requires_grad_() for x in (q, k, v))
    q32, k32, v32 = (x.clone().requires_grad_() for x in (q, k, v))
    out = attend(q16, k16, v16, plan(q16, k16, 0), backend="triton")
    expected = attend(q32, k32, v32, plan(q32, k32, 0), backend="reference")
    assert relative_error(out, expected) < 1e-2  # bf16 operands, fp32 accumulation
    assert (out[:, 3] == 0).all()
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q16, k16, v16), grad.bfloat16())
    want = torch.autograd.grad(expected, (q32, k32, v32), grad)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 2e-2


def test_module_on_the_kernel_matches_the_reference():
    torch.manual_seed(0)
    layout = Pattern.of("tiles", tile=(1, 8, 16), window=(1, 3, 3)).build(GRID, device=DEVICE).repeat_heads(4)
    kernel = SparseAttention(512, 4, rotary="3d", grid=GRID, layout=layout, backend="triton").to(DEVICE)
    reference = SparseAttention(512, 4, rotary="3d", grid=GRID, layout=layout, backend="reference").to(DEVICE)
    reference.load_state_dict(kernel.state_dict())
    x = torch.randn(2, GRID.tokens, 512, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = kernel(x)
    expected = reference(x)
    assert relative_error(out, expected) < 2e-2
    out.float().square().sum().backward()
    expected.square().sum().backward()
    assert relative_error(kernel.qkv.weight.grad, reference.qkv.weight.grad) < 3e-2


def test_dynamic_selection_and_sparsed_never_synchronise_with_the_host():
    q = torch.randn(1, 8, 4096, 128, device=DEVICE, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    schedule = SparseDSchedule(10, keep_ratio=0.5, block=128, prompt_len=1000)
    attend(q, k, v, DynamicBlockSelection(topk=4)(q, k, 0))  # compile and warm up first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attend(q, k, v, DynamicBlockSelection(topk=8)(q, k, 0))
        attend(q, k, v, DynamicBlockSelection(mass=0.9)(q, k, 0))
        schedule.step = 5
        groups = schedule(q, k, 0)
        out = attend(q, k, v, groups)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (groups[0].layout.mask.sum(-1) == 4 + 12).all()  # half the 8 prompt and half the 24 answer blocks
    expected = attend(q.float(), k.float(), v.float(), groups, backend="reference")
    assert relative_error(out, expected) < 1e-2
