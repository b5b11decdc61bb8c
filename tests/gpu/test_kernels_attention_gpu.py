"""The block-sparse attention kernels at full size on CUDA (bf16/fp16, N 4k-32k).

Reference: the pure-torch float32 reference on the same bf16 inputs. Tolerances (relative
Frobenius error): O 1e-2, dQ/dK/dV 2e-2 for bf16 (P and dS are rounded to bf16 before their
matmuls); 5e-3 / 1e-2 for fp16.
"""

import importlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from sparta.kernels import block_sparse_attention, block_sparse_attention_reference, build_kernel_layout  # noqa: E402

attention_module = importlib.import_module("sparta.kernels.block_sparse_attention")
TOLERANCE = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (5e-3, 1e-2)}


def rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def random_inputs(batch, heads, kv_heads, seqlen, head_dim, dtype, seed=0):
    torch.manual_seed(seed)
    make = lambda h: torch.randn(batch, h, seqlen, head_dim, device="cuda", dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def random_block_mask(batch, heads, num_blocks, density, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(batch, heads, num_blocks, num_blocks, device="cuda", generator=gen) < density
    return mask | torch.eye(num_blocks, dtype=torch.bool, device="cuda")


def check_against_reference(q, k, v, layout, dtype):
    o_tol, grad_tol = TOLERANCE[dtype]
    o, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
    d_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), d_o)
    o_ref, lse_ref = block_sparse_attention_reference(q, k, v, layout, return_lse=True)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), d_o)
    assert rel_err(o, o_ref) < o_tol, rel_err(o, o_ref)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=2e-2, rtol=1e-3)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(a, b) < grad_tol, f"{name}: {rel_err(a, b):.2e}"


def test_gpu_layout_builder_matches_the_cpu_builder():
    """The one-launch Triton builder (whose last program sorts the launch order after an atomic
    count) equals the torch builder, over many builds of different sizes: a lost update or a stale
    count would show as a different order."""
    gen = torch.Generator().manual_seed(7)
    for trial in range(40):
        batch, heads, blocks = 1 + trial % 3, 1 + trial % 5, 8 + 13 * trial
        mask = torch.rand(batch, heads, blocks, blocks, generator=gen) < torch.rand(batch, heads, blocks, 1, generator=gen)
        causal = bool(trial % 2)
        cpu = build_kernel_layout(mask, 128, 128, seqlen_q=blocks * 128, seqlen_k=blocks * 128, causal=causal)
        gpu = build_kernel_layout(mask.cuda(), 128, 128, seqlen_q=blocks * 128, seqlen_k=blocks * 128, causal=causal)
        for name in ("kv_count", "kv_full_count", "kv_index", "q_count", "q_full_count", "q_index", "q_block_order"):
            assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), (trial, name)


@pytest.mark.parametrize("batch, heads, kv_heads, seqlen, head_dim, density, causal, dtype", [
    (1, 4, 4, 4096, 128, 0.3, False, torch.bfloat16),
    (2, 4, 1, 8192, 64, 0.5, True, torch.bfloat16),
    (1, 2, 2, 16384, 128, 0.1, False, torch.bfloat16),
    (1, 1, 1, 32768, 64, 0.1, True, torch.bfloat16),
    (1, 2, 2, 4000, 64, 0.5, True, torch.float16),   # sequence end inside a block
])
def test_matches_reference(batch, heads, kv_heads, seqlen, head_dim, density, causal, dtype):
    q, k, v = random_inputs(batch, heads, kv_heads, seqlen, head_dim, dtype)
    block_mask = random_block_mask(batch, heads, -(-seqlen // 128), density)
    layout = build_kernel_layout(block_mask, 128, 128, seqlen_q=seqlen, seqlen_k=seqlen, causal=causal)
    check_against_reference(q, k, v, layout, dtype)


def test_many_more_query_blocks_than_key_blocks():
    """32 query blocks over 2 key blocks (GQA): the dK/dV launch order sorts lists of up to 64 query
    blocks per key/value head, far longer than the 2 blocks per row of the transposed layout."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    block_mask = torch.ones(1, 4, 32, 2, dtype=torch.bool, device="cuda")
    layout = build_kernel_layout(block_mask, 128, 128, seqlen_q=4096, seqlen_k=256)
    check_against_reference(q, k, v, layout, torch.bfloat16)


def test_varlen_matches_reference():
    lengths = [1000, 5000, 3000, 7192]
    cu = torch.tensor([0, 1000, 6000, 9000, 16192], dtype=torch.int32, device="cuda")
    q, k, v = random_inputs(1, 2, 1, 16192, 128, torch.bfloat16)
    block_mask = random_block_mask(len(lengths), 2, -(-max(lengths) // 128), 0.4)
    layout = build_kernel_layout(block_mask, 128, 128, seqlen_q=max(lengths), seqlen_k=max(lengths), causal=True,
                                 cu_seqlens_q=cu, cu_seqlens_k=cu)
    check_against_reference(q, k, v, layout, torch.bfloat16)


def test_dense_matches_sdpa():
    q, k, v = random_inputs(1, 8, 8, 4096, 128, torch.bfloat16)
    layout = build_kernel_layout(torch.ones(1, 8, 32, 32, dtype=torch.bool, device="cuda"), 128, 128,
                                 seqlen_q=4096, seqlen_k=4096, causal=True)
    o = block_sparse_attention(q, k, v, layout)
    d_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), d_o)
    o_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads_sdpa = torch.autograd.grad(o_sdpa, (q, k, v), d_o)
    assert rel_err(o, o_sdpa) < 1e-2
    for a, b in zip(grads, grads_sdpa):
        assert rel_err(a, b) < 2e-2


def test_no_host_sync_and_deterministic_backward():
    q, k, v = random_inputs(1, 4, 2, 8192, 128, torch.bfloat16)
    block_mask = random_block_mask(1, 4, 64, 0.3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        layout = build_kernel_layout(block_mask, 128, 128, seqlen_q=8192, seqlen_k=8192, causal=True)
        o = block_sparse_attention(q, k, v, layout)
        d_o = torch.randn_like(o)
        first = torch.autograd.grad(o, (q, k, v), d_o, retain_graph=True)
        second = torch.autograd.grad(o, (q, k, v), d_o)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autotune_picks_a_correct_candidate(monkeypatch):
    """Head dim 64: the Triton forward runs there on every GPU (at 128 an H100 runs the Gluon one)."""
    monkeypatch.setenv("SPARTA_ATTENTION_AUTOTUNE", "1")
    monkeypatch.setattr(attention_module, "_AUTOTUNED", {})
    q, k, v = random_inputs(1, 2, 2, 2000, 64, torch.bfloat16)
    layout = build_kernel_layout(random_block_mask(1, 2, 16, 0.5), 128, 128, seqlen_q=2000, seqlen_k=2000)
    check_against_reference(q, k, v, layout, torch.bfloat16)
    assert {key[0] for key in attention_module._AUTOTUNED} == {"fwd", "bwd"}


def _candidate_pairs():
    """(head dim, fwd config, bwd config): each candidate of each pass at least once."""
    table = attention_module.CANDIDATE_CONFIGS
    for head_dim in (64, 128):
        lists = [table[(kind, head_dim)] for kind in ("fwd", "bwd")]
        for i in range(max(map(len, lists))):
            yield (head_dim,) + tuple(configs[min(i, len(configs) - 1)] for configs in lists)


@pytest.mark.parametrize("head_dim, fwd_config, bwd_config", list(_candidate_pairs()))
def test_every_candidate_config(head_dim, fwd_config, bwd_config):
    """Whatever the autotuner picks is correct. Non-causal with a sequence end inside the last block:
    the masked loop runs, and the compiled kernels are the benchmark's (shared Triton cache)."""
    seqlen = 2000
    q, k, v = random_inputs(1, 2, 1, seqlen, head_dim, torch.bfloat16)
    layout = build_kernel_layout(random_block_mask(1, 2, 16, 0.5), 128, 128, seqlen_q=seqlen, seqlen_k=seqlen)
    o_ref = block_sparse_attention_reference(q, k, v, layout)
    d_o = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), d_o)
    problem = attention_module._Problem(128, 128, seqlen, seqlen, False, False)
    lists = (layout.kv_count, layout.kv_full_count, layout.kv_index, layout.q_block_order)
    transposed = (layout.q_count, layout.q_full_count, layout.q_index)
    scale = head_dim ** -0.5
    qd, kd, vd = (x.detach() for x in (q, k, v))
    o, lse = attention_module._forward(qd, kd, vd, *lists, None, None, problem, scale, config=fwd_config)
    assert rel_err(o, o_ref) < 1e-2
    grads = attention_module._backward(d_o, torch.zeros_like(lse), qd, kd, vd, o, lse, *lists, *transposed,
                                       None, None, problem, scale, config=bwd_config)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(a, b) < 2e-2, name


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0), reason="the Gluon forward runs on sm_90 only")
@pytest.mark.parametrize("batch, heads, kv_heads, seqlen, density, causal, dtype, blocks, layout_batch", [
    (1, 4, 4, 4096, 0.3, False, torch.bfloat16, (128, 128), 1),
    (2, 4, 2, 4096, 0.3, True, torch.bfloat16, (128, 128), 1),     # one layout for the whole batch
    (2, 4, 1, 4096, 0.5, True, torch.bfloat16, (128, 128), 2),
    (1, 2, 2, 4000, 0.5, True, torch.bfloat16, (64, 64), 1),       # sequence end inside a block
    (1, 2, 2, 4096, 0.5, False, torch.float16, (128, 64), 1),
    (1, 2, 2, 4096, 0.5, False, torch.bfloat16, (64, 128), 1),
    (1, 4, 2, 4096, 0.2, False, torch.bfloat16, (128, 128), 1),    # no diagonal: empty rows
    (1, 1, 1, 512, 0.5, False, torch.bfloat16, (128, 128), 1),     # fewer query tiles than SMs
], ids=["plain", "batch-broadcast", "gqa-causal", "blocks-64", "fp16-kblock-64", "qblock-64", "empty-rows", "tiny"])
def test_hopper_forward_is_the_triton_forward(batch, heads, kv_heads, seqlen, density, causal, dtype, blocks,
                                              layout_batch):
    """The Gluon forward (persistent, its own schedule) computes the same bits as the Triton one."""
    q, k, v = (x.detach() for x in random_inputs(batch, heads, kv_heads, seqlen, 128, dtype))
    block_q, block_k = blocks
    gen = torch.Generator(device="cuda").manual_seed(1)
    block_mask = torch.rand(layout_batch, heads, -(-seqlen // block_q), -(-seqlen // block_k), device="cuda",
                            generator=gen) < density
    if density > 0.2:
        block_mask |= torch.eye(block_mask.shape[-2], block_mask.shape[-1], dtype=torch.bool, device="cuda")
    layout = build_kernel_layout(block_mask, block_q, block_k, seqlen_q=seqlen, seqlen_k=seqlen, causal=causal)
    assert_hopper_equals_triton(q, k, v, layout)


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0), reason="the Gluon forward runs on sm_90 only")
def test_hopper_forward_is_the_triton_forward_varlen():
    cu = torch.tensor([0, 1000, 6000, 9000, 16192], dtype=torch.int32, device="cuda")
    q, k, v = (x.detach() for x in random_inputs(1, 4, 2, 16192, 128, torch.bfloat16))
    block_mask = random_block_mask(4, 4, -(-7192 // 128), 0.4)
    layout = build_kernel_layout(block_mask, 128, 128, seqlen_q=7192, seqlen_k=7192, causal=True,
                                 cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert_hopper_equals_triton(q, k, v, layout)


def assert_hopper_equals_triton(q, k, v, layout):
    tensors, scalars = attention_module._layout_args(layout)
    problem = attention_module._Problem(*scalars, layout.is_varlen)
    args = (q, k, v, *tensors[:4], *tensors[7:], problem, q.shape[-1] ** -0.5)
    triton_config = attention_module._fit(attention_module.TUNED_CONFIGS[("fwd", 128)], problem.block_q, problem.block_k)
    o, lse = attention_module._forward(*args)
    o_triton, lse_triton = attention_module._forward(*args, config=triton_config)
    assert torch.equal(o, o_triton)
    assert torch.equal(lse, lse_triton)
