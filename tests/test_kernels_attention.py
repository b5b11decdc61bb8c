"""The Triton block-sparse attention kernels against the pure-torch reference, on CPU.

The kernels run under the Triton interpreter (set before triton is first imported) on tiny shapes:
each program costs milliseconds there, so blocks are few and large. Tolerances (relative Frobenius
error against the float32 reference): float32 inputs 1e-5; float16 inputs 5e-3 (P and dS are
rounded to float16 before their matmuls, as on the GPU). bfloat16 is tested on the GPU only: the
interpreter's bf16 arithmetic is wrong.
"""

import importlib

import pytest
import torch

from sparta.kernels import block_sparse_attention, block_sparse_attention_reference, build_kernel_layout

attention_module = importlib.import_module("sparta.kernels.block_sparse_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def random_problem(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return (make(batch, heads, seqlen_q, head_dim), make(batch, kv_heads, seqlen_k, head_dim),
            make(batch, kv_heads, seqlen_k, head_dim))


def outputs_and_grads(attention, q, k, v, layout, seed=1):
    """O, LSE and the gradients of a loss that uses both O and the (finite) LSE."""
    o, lse = attention(q, k, v, layout, return_lse=True)
    gen = torch.Generator().manual_seed(seed)
    d_o = torch.randn(o.shape, generator=gen).to(DEVICE)
    d_lse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    loss = (o.float() * d_o).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * d_lse).sum()
    return (o, lse) + torch.autograd.grad(loss, (q, k, v))


def assert_matches_reference(q, k, v, layout, tolerance):
    got = outputs_and_grads(block_sparse_attention, q, k, v, layout)
    want = outputs_and_grads(block_sparse_attention_reference, q, k, v, layout)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert not a.isnan().any(), name
        assert rel_err(a, b) < tolerance, f"{name}: relative error {rel_err(a, b):.2e}"
    lse, lse_ref = got[1], want[1]
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=1e-4, rtol=1e-4)
    return got


@pytest.mark.parametrize("case", [
    # batch, heads, kv heads, seqlen_q, seqlen_k, head dim, block_q, block_k, causal, dtype, layout batch
    dict(shape=(2, 2, 2, 128, 128, 32), blocks=(32, 32), causal=False, dtype=torch.float32, layout_batch=2),
    dict(shape=(1, 4, 2, 128, 128, 64), blocks=(32, 32), causal=True, dtype=torch.float16, layout_batch=1),
    dict(shape=(1, 2, 1, 100, 72, 16), blocks=(32, 16), causal=True, dtype=torch.float32, layout_batch=1),
    dict(shape=(2, 2, 2, 96, 96, 32), blocks=(32, 32), causal=False, dtype=torch.float16, layout_batch=1),
], ids=["random-fp32", "causal-gqa-fp16", "uneven-lengths-fp32", "batch-broadcast-fp16"])
def test_matches_reference(case):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = case["shape"]
    block_q, block_k = case["blocks"]
    q, k, v = random_problem(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, case["dtype"])
    gen = torch.Generator().manual_seed(2)
    block_mask = torch.rand(case["layout_batch"], heads, -(-seqlen_q // block_q), -(-seqlen_k // block_k),
                            generator=gen) < 0.6
    block_mask[..., 0, :] = False  # an empty query block row in every head
    layout = build_kernel_layout(block_mask.to(DEVICE), block_q, block_k, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                 causal=case["causal"])
    assert_matches_reference(q, k, v, layout, TOLERANCE[case["dtype"]])


def test_empty_head_is_zero_and_full_head_matches_sdpa():
    q, k, v = random_problem(1, 2, 2, 64, 64, 32, torch.float32)
    block_mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    block_mask[:, 1] = True  # head 0 skipped, head 1 dense
    layout = build_kernel_layout(block_mask.to(DEVICE), 32, 32, seqlen_q=64, seqlen_k=64)
    o, lse, dq, dk, dv = assert_matches_reference(q, k, v, layout, TOLERANCE[torch.float32])
    assert torch.equal(o[:, 0], torch.zeros_like(o[:, 0]))
    assert bool((lse[:, 0] == float("-inf")).all())
    for grad in (dq, dk, dv):
        assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, 1:], k[:, 1:], v[:, 1:])
    assert rel_err(o[:, 1:], sdpa) < 1e-5


def test_varlen_matches_each_sequence_alone():
    lengths = [40, 88, 22]
    cu = torch.tensor([0, 40, 128, 150], dtype=torch.int32, device=DEVICE)
    q, k, v = random_problem(1, 2, 1, 150, 150, 16, torch.float32)
    gen = torch.Generator().manual_seed(3)
    block_mask = (torch.rand(3, 2, 3, 3, generator=gen) < 0.7).to(DEVICE)
    layout = build_kernel_layout(block_mask, 32, 32, seqlen_q=88, seqlen_k=88, causal=True,
                                 cu_seqlens_q=cu, cu_seqlens_k=cu)
    o, lse, dq, dk, dv = assert_matches_reference(q, k, v, layout, TOLERANCE[torch.float32])

    start = 0  # the same numbers from one non-packed call per sequence
    for b, length in enumerate(lengths):
        part = slice(start, start + length)
        single = build_kernel_layout(block_mask[b:b + 1, :, :-(-length // 32), :-(-length // 32)], 32, 32,
                                     seqlen_q=length, seqlen_k=length, causal=True)
        qs, ks, vs = (x.detach()[:, :, part].clone().requires_grad_() for x in (q, k, v))
        o_b, lse_b, dq_b, dk_b, dv_b = outputs_and_grads(block_sparse_attention, qs, ks, vs, single)
        assert rel_err(o[:, :, part], o_b) < 1e-5
        torch.testing.assert_close(lse[:, :, part], lse_b)
        start += length


def test_split_tiles_match_whole_blocks():
    """Configs that split a layout block into smaller tiles (as the GPU configs do) give the same result."""
    q, k, v = random_problem(1, 2, 1, 64, 64, 16, torch.float32)
    gen = torch.Generator().manual_seed(4)
    block_mask = (torch.rand(1, 2, 2, 2, generator=gen) < 0.8).to(DEVICE)
    layout = build_kernel_layout(block_mask, 32, 32, seqlen_q=64, seqlen_k=64, causal=True)
    problem = attention_module._Problem(32, 32, 64, 64, True, False)
    lists = (layout.kv_count, layout.kv_full_count, layout.kv_index, layout.q_block_order)
    o, lse = attention_module._forward(q, k, v, *lists, None, None, problem, 0.25,
                                       config=attention_module.Config(2, 2, 4, 1))
    o_ref, lse_ref = block_sparse_attention_reference(q, k, v, layout, sm_scale=0.25, return_lse=True)
    assert rel_err(o, o_ref) < 1e-5
    d_o = torch.randn_like(o)
    grads = attention_module._backward(d_o, torch.zeros_like(lse), q, k, v, o, lse, *lists, layout.q_count,
                                       layout.q_full_count, layout.q_index, None, None, problem, 0.25,
                                       config=attention_module.BackwardConfig(2, 2, 2, 2, 4, 1))
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), d_o)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(a, b) < 1e-5, name


def test_torch_compile_full_graph():
    """The kernels are custom ops: a compiled function with the call inside has no graph break."""
    q, k, v = random_problem(1, 2, 2, 64, 64, 16, torch.float32)
    layout = build_kernel_layout(torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE), 32, 32,
                                 seqlen_q=64, seqlen_k=64, causal=True)

    def loss_fn(q, k, v):
        return (block_sparse_attention(q, k, v, layout) ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(loss_fn(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def _good():
    q, k, v = random_problem(1, 4, 2, 64, 64, 16, torch.float16)
    layout = build_kernel_layout(torch.ones(1, 4, 2, 2, dtype=torch.bool, device=DEVICE), 32, 32,
                                 seqlen_q=64, seqlen_k=64)
    return dict(q=q, k=k, v=v, layout=layout)


@pytest.mark.parametrize("change, name", [
    (lambda a: dict(k=a["k"].float()), "k"),
    (lambda a: dict(q=a["q"][0]), "q"),
    (lambda a: dict(q=a["q"].to(torch.int32)), "q"),
    (lambda a: dict(q=torch.zeros(1, 4, 64, 48, dtype=torch.float16, device=DEVICE)), "head dim"),
    (lambda a: dict(k=a["k"][:, :, :32]), "k, v"),
    (lambda a: dict(k=torch.zeros(1, 3, 64, 16, dtype=torch.float16, device=DEVICE),
                    v=torch.zeros(1, 3, 64, 16, dtype=torch.float16, device=DEVICE)), "k"),
    (lambda a: dict(q=a["q"][:, :2]), "layout"),
    (lambda a: dict(q=a["q"][:, :, :32]), "layout"),
    (lambda a: dict(layout="dense"), "layout"),
    (lambda a: dict(sm_scale=-1.0), "sm_scale"),
], ids=["dtype-mismatch", "not-4d", "int-dtype", "head-dim", "k-v-shapes", "gqa-ratio", "layout-heads",
        "layout-seqlen", "not-a-layout", "negative-scale"])
def test_bad_input_names_the_argument(change, name):
    args = _good()
    args.update(change(args))
    with pytest.raises(ValueError, match=name):
        block_sparse_attention(**args)
