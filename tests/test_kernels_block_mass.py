"""The Triton block-mass kernel against the pure-torch reference, on CPU.

The kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny
shapes: each program costs milliseconds there. Tolerance: relative Frobenius error 1e-5 against the
float32 reference, for float32 and float16 inputs alike (the products of float16 values are exact in
float32; only the summation order differs). bfloat16 is tested on the GPU only: the interpreter's
bf16 arithmetic is wrong.
"""

import pytest
import torch

from sparta.attention import attention_block_mass, selection
from sparta.kernels import block_mass, block_mass_reference
from sparta.kernels.block_mass import Config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5


def rel_err(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def random_qk(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed=0, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = spread * torch.randn(batch, heads, seqlen_q, head_dim, generator=gen)
    k = spread * torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


@pytest.mark.parametrize("case", [
    # batch, heads, kv heads, seqlen_q, seqlen_k, head dim, block_q, block_k, causal, region_starts, dtype
    dict(shape=(2, 2, 2, 64, 64, 16), blocks=(32, 32), causal=False, regions=(0,), dtype=torch.float32),
    dict(shape=(1, 4, 2, 64, 64, 32), blocks=(32, 32), causal=True, regions=(0,), dtype=torch.float16),
    dict(shape=(1, 2, 1, 70, 90, 16), blocks=(32, 16), causal=False, regions=(0, 2, 5), dtype=torch.float32),
    dict(shape=(1, 2, 2, 100, 100, 16), blocks=(32, 64), causal=True, regions=(0, 1), dtype=torch.float32),
    dict(shape=(1, 2, 1, 48, 80, 16), blocks=(16, 32), causal=True, regions=(0, 2), dtype=torch.float16),
], ids=["square-fp32", "causal-gqa-fp16", "uneven-regions-fp32", "causal-wide-key-blocks", "causal-regions-fp16"])
def test_matches_reference(case):
    q, k = random_qk(*case["shape"], case["dtype"])
    block_q, block_k = case["blocks"]
    kwargs = dict(causal=case["causal"], region_starts=case["regions"])
    got = block_mass(q, k, block_q, block_k, **kwargs)
    want = block_mass_reference(q, k, block_q, block_k, **kwargs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < TOLERANCE, rel_err(got, want)
    if not case["causal"]:  # every row reaches every region: block rows sum to rows x regions
        rows = torch.tensor([min(block_q, case["shape"][3] - i * block_q) for i in range(got.shape[2])], device=DEVICE)
        torch.testing.assert_close(got.sum(-1), (rows * len(case["regions"])).float().expand_as(got[..., 0]))


def test_varlen_matches_each_sequence_alone():
    lengths = [40, 88, 22]
    cu = torch.tensor([0, 40, 128, 150], dtype=torch.int32, device=DEVICE)
    q, k = random_qk(1, 2, 1, 150, 150, 16, torch.float32)
    kwargs = dict(causal=True, region_starts=(0, 2), cu_seqlens_q=cu, cu_seqlens_k=cu, seqlen_q=88, seqlen_k=88)
    got = block_mass(q, k, 32, 32, **kwargs)
    assert got.shape == (3, 2, 3, 3)
    assert rel_err(got, block_mass_reference(q, k, 32, 32, **kwargs)) < TOLERANCE
    start = 0
    for b, length in enumerate(lengths):
        part = slice(start, start + length)
        blocks = -(-length // 32)
        alone = block_mass(q[:, :, part], k[:, :, part], 32, 32, causal=True,
                           region_starts=(0, 2) if blocks > 2 else (0,))
        torch.testing.assert_close(got[b:b + 1, :, :blocks, :blocks], alone)
        assert not got[b, :, blocks:].any() and not got[b, :, :, blocks:].any()
        start += length


def test_split_key_blocks_and_program_counts_match():
    """Key blocks cut into several tiles (as the GPU configs may) and any number of persistent
    programs (each reusing its scratch over many query blocks) give the same result."""
    q, k = random_qk(1, 2, 1, 96, 96, 16, torch.float32, seed=3)
    want = block_mass_reference(q, k, 32, 64, causal=True, region_starts=(0, 1))
    for config in (Config(16, 4, 1, 1), Config(32, 4, 1, 5), Config(64, 4, 1, 64)):
        got = block_mass(q, k, 32, 64, causal=True, region_starts=(0, 1), config=config)
        assert rel_err(got, want) < TOLERANCE, config


def test_large_logits_stay_finite():
    """Rows dominated by one key (logits in the hundreds) give no overflow and no NaN."""
    q, k = random_qk(1, 2, 2, 64, 64, 32, torch.float32, seed=4, spread=6.0)
    got = block_mass(q, k, 32, 32, causal=True)
    assert torch.isfinite(got).all()
    assert rel_err(got, block_mass_reference(q, k, 32, 32, causal=True)) < TOLERANCE


def test_attention_block_mass_dispatches_to_the_kernel(monkeypatch):
    """Where the kernel applies (CUDA half tensors; forced here), `attention_block_mass` runs it and
    returns what its torch path returns: the kernel's sums over each block's element count."""
    q, k = random_qk(2, 2, 1, 45, 70, 16, torch.float32, seed=5)
    expected = attention_block_mass(q, k, 32, 16, region_starts=(0, 3))  # torch path: not CUDA
    calls = []
    monkeypatch.setattr(selection, "block_mass_supports", lambda *args: True)
    monkeypatch.setattr(selection, "block_mass", lambda *a, **kw: calls.append(1) or block_mass(*a, **kw))
    torch.testing.assert_close(attention_block_mass(q, k, 32, 16, region_starts=(0, 3)), expected)
    assert calls == [1]


def _good():
    q, k = random_qk(1, 4, 2, 64, 64, 16, torch.float16)
    return dict(q=q, k=k, block_q=32, block_k=32)


@pytest.mark.parametrize("change, name", [
    (lambda a: dict(q=a["q"][0]), "q"),
    (lambda a: dict(k=a["k"].float()), "k"),
    (lambda a: dict(q=a["q"].to(torch.int32), k=a["k"].to(torch.int32)), "q"),
    (lambda a: dict(q=torch.zeros(1, 4, 64, 48, dtype=torch.float16, device=DEVICE)), "head dim"),
    (lambda a: dict(k=torch.zeros(1, 3, 64, 16, dtype=torch.float16, device=DEVICE)), "k"),
    (lambda a: dict(block_q=48), "block_q"),
    (lambda a: dict(block_q=256), "block_q"),
    (lambda a: dict(block_k=8), "block_k"),
    (lambda a: dict(region_starts=(1,)), "region_starts"),
    (lambda a: dict(region_starts=(0, 2)), "region_starts"),
    (lambda a: dict(sm_scale=0.0), "sm_scale"),
    (lambda a: dict(cu_seqlens_q=torch.tensor([0, 64], dtype=torch.int32, device=DEVICE)), "cu_seqlens"),
    (lambda a: dict(cu_seqlens_q=torch.tensor([0, 64]), cu_seqlens_k=torch.tensor([0, 64]), seqlen_q=64,
                    seqlen_k=64), "cu_seqlens_q"),
    (lambda a: dict(cu_seqlens_q=torch.tensor([0, 64], dtype=torch.int32, device=DEVICE),
                    cu_seqlens_k=torch.tensor([0, 64], dtype=torch.int32, device=DEVICE)), "seqlen_q"),
    (lambda a: dict(seqlen_q=64), "seqlen_q"),
], ids=["not-4d", "dtype-mismatch", "int-dtype", "head-dim", "gqa-ratio", "block-q-not-pow2", "block-q-too-big",
        "block-k-too-small", "regions-not-from-0", "regions-past-end", "zero-scale", "one-cu-seqlens",
        "cu-seqlens-int64", "varlen-no-seqlen", "seqlen-without-varlen"])
def test_bad_input_names_the_argument(change, name):
    args = _good()
    args.update(change(args))
    with pytest.raises(ValueError, match=name):
        block_mass(**args)
