"""The block-mass kernel at full size on CUDA (bf16/fp16, N up to 32k), and SparseD and the pattern
search running on it.

Reference: the pure-torch float32 reference (or, at 32k tokens, `attention_block_mass`'s chunked
torch path) on the same bf16/fp16 inputs; the products are exact in float32 on both sides, so only
summation order and exp2 rounding differ. Tolerance: relative Frobenius error 1e-4. Top-k selections
must agree except on ties: a block that one selection keeps and the other drops must hold the same
mass (per the torch path) to within 1e-4 relative.
"""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from sparta.attention import PatternSearch, SparseDSchedule, VideoGrid, attention_block_mass, selection  # noqa: E402
from sparta.kernels import block_mass, block_mass_reference  # noqa: E402

DEVICE = "cuda"
TOLERANCE = 1e-4


def rel_err(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def random_qk(batch, heads, kv_heads, seqlen, head_dim, dtype, seed=0, scale=1.0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda h: (scale * torch.randn(batch, h, seqlen, head_dim, device=DEVICE, generator=gen)).to(dtype)  # noqa: E731
    return make(heads), make(kv_heads)


def blocky_qk(heads, seqlen, head_dim=128, block=128, seed=0):
    """bf16 q, k whose block pairs have clearly different mass: each query block and key block shares
    a random direction (block logits ~ N(0, 2.25^2)) on top of per-token noise."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks = -(-seqlen // block)
    shared = lambda: 1.5 * torch.randn(heads, blocks, head_dim, device=DEVICE, generator=gen)  # noqa: E731
    q = torch.randn(1, heads, seqlen, head_dim, device=DEVICE, generator=gen) + \
        shared().repeat_interleave(block, dim=1)[None, :, :seqlen]
    k = torch.randn(1, heads, seqlen, head_dim, device=DEVICE, generator=gen) + \
        shared().repeat_interleave(block, dim=1)[None, :, :seqlen]
    return q.bfloat16(), k.bfloat16()


def assert_same_selection_up_to_ties(mask, expected_mask, mass, regions):
    """Per region, blocks kept by one selection and dropped by the other hold equal mass (1e-4)."""
    for lo, hi in regions:
        a, b, m = mask[..., lo:hi], expected_mask[..., lo:hi], mass[..., lo:hi]
        differs = (a != b).any(-1)
        if not differs.any():
            continue
        swapped = (a != b)[differs]
        values = m[differs]
        top = torch.where(swapped, values, -math.inf).amax(-1)
        bottom = torch.where(swapped, values, math.inf).amin(-1)
        assert ((top - bottom) / top).max() < 1e-4, f"{int(differs.sum())} rows select differently, not ties"


@pytest.mark.parametrize("case", [
    # batch, heads, kv heads, seqlen, head dim, block_q, block_k, causal, region_starts, dtype
    dict(shape=(1, 8, 2, 4096, 128), blocks=(128, 128), causal=False, regions=(0,), dtype=torch.bfloat16),
    dict(shape=(2, 4, 4, 3000, 128), blocks=(128, 128), causal=True, regions=(0, 10), dtype=torch.bfloat16),
    dict(shape=(1, 4, 1, 4000, 64), blocks=(64, 256), causal=False, regions=(0, 3, 12), dtype=torch.float16),
    dict(shape=(1, 4, 2, 2048, 64), blocks=(128, 64), causal=True, regions=(0,), dtype=torch.float16),
], ids=["gqa-bf16", "causal-uneven-regions-bf16", "d64-wide-key-blocks-fp16", "causal-gqa-d64-fp16"])
def test_matches_reference(case):
    q, k = random_qk(*case["shape"], case["dtype"], scale=1.5)
    block_q, block_k = case["blocks"]
    kwargs = dict(causal=case["causal"], region_starts=case["regions"])
    got = block_mass(q, k, block_q, block_k, **kwargs)
    assert rel_err(got, block_mass_reference(q, k, block_q, block_k, **kwargs)) < TOLERANCE


def test_varlen_matches_reference():
    cu = torch.tensor([0, 1000, 4096, 5000], dtype=torch.int32, device=DEVICE)
    q, k = random_qk(1, 8, 2, 5000, 128, torch.bfloat16, scale=1.5)
    kwargs = dict(causal=True, region_starts=(0, 4), cu_seqlens_q=cu, cu_seqlens_k=cu, seqlen_q=3096, seqlen_k=3096)
    got = block_mass(q, k, 128, 128, **kwargs)
    assert rel_err(got, block_mass_reference(q, k, 128, 128, **kwargs)) < TOLERANCE


def test_tuned_and_candidate_configs_agree():
    from sparta.kernels.block_mass import CANDIDATE_CONFIGS

    q, k = random_qk(1, 4, 4, 4096, 128, torch.bfloat16, scale=1.5)
    want = block_mass_reference(q, k, 128, 128, causal=True, region_starts=(0, 7))
    for config in CANDIDATE_CONFIGS[128]:
        got = block_mass(q, k, 128, 128, causal=True, region_starts=(0, 7), config=config)
        assert rel_err(got, want) < TOLERANCE, config


def test_sparsed_at_32k_selects_as_the_torch_path_in_bounded_memory(monkeypatch):
    """SparseD's switch step at 32k tokens, 16 heads: the kernel (through attention_block_mass)
    matches the torch path, selects the same blocks, and needs no N x N memory."""
    q, k = blocky_qk(16, 32768)
    schedule = SparseDSchedule(50, keep_ratio=0.3, block=128, prompt_len=32768 - 1024)
    regions = [(0, 248), (248, 256)]
    calls = []
    monkeypatch.setattr(selection, "block_mass", lambda *a, **kw: calls.append(1) or block_mass(*a, **kw))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mass = attention_block_mass(q, k, 128, 128, region_starts=[0, 248])
    extra = torch.cuda.max_memory_allocated() - before
    mask = schedule.select(q, k).mask
    assert len(calls) == 2  # both went through the kernel
    assert extra < 64 * 2**20, f"{extra / 2**20:.0f} MiB beyond the inputs"  # out 4 MiB, scratch <= 34 MiB

    monkeypatch.setattr(selection, "block_mass_supports", lambda *args: False)  # the torch path
    expected = attention_block_mass(q, k, 128, 128, region_starts=[0, 248])
    expected_mask = schedule.select(q, k).mask
    assert rel_err(mass, expected) < TOLERANCE
    assert_same_selection_up_to_ties(mask, expected_mask, expected, regions)


def test_search_stripes_come_from_the_kernel(monkeypatch):
    """The pattern search's data-driven stripes run on the kernel and find each head's planted keys."""
    grid = VideoGrid(4, 8, 8)  # 256 tokens, blocks of 16
    stripes = [(80, 96, 176, 192), (0, 16, 224, 240)]  # two key blocks per head
    q = torch.zeros(1, 2, grid.tokens, 64, device=DEVICE)
    k = torch.zeros(1, 2, grid.tokens, 64, device=DEVICE)
    q[..., 0] = 200.0  # logit 25 on the stripe keys, 0 elsewhere
    for head, (a0, a1, b0, b1) in enumerate(stripes):
        k[0, head, a0:a1, 0] = k[0, head, b0:b1, 0] = 1.0
    calls = []
    monkeypatch.setattr(selection, "block_mass", lambda *a, **kw: calls.append(1) or block_mass(*a, **kw))
    search = PatternSearch(grid, block=16, stripe_blocks=(2,))
    (candidate,) = search._stripe_candidates(q.bfloat16(), k.bfloat16())
    assert calls == [1]
    for head, (a0, a1, b0, b1) in enumerate(stripes):
        assert candidate[head].params == (("keys", ((a0, a1), (b0, b1))),)
