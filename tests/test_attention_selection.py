"""Dynamic block selection: pooling, block scores, top-k and mass selection, exact block mass."""

import itertools

import pytest
import torch

from sparta.attention import (
    DynamicBlockSelection,
    attention_block_mass,
    mass_blocks,
    pool_blocks,
    pooled_block_logits,
    topk_blocks,
)


def test_pool_blocks_averages_each_blocks_own_tokens():
    x = torch.randn(2, 3, 37, 4)  # blocks of 16, 16, 5 tokens
    pooled = pool_blocks(x, 16)
    for index, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 37)]):
        torch.testing.assert_close(pooled[:, :, index], x[:, :, lo:hi].mean(dim=2))


def test_pooled_block_logits_with_gqa():
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)  # 2 query heads per key head
    logits = pooled_block_logits(q, k, 16, 16)
    sizes = torch.tensor([16.0, 16.0, 8.0])
    for h in range(4):
        expected = pool_blocks(q, 16)[0, h] @ pool_blocks(k, 16)[0, h // 2].T / 8 ** 0.5 + sizes.log()
        torch.testing.assert_close(logits[0, h], expected)


def test_topk_blocks_keeps_the_k_highest_per_row():
    scores = torch.randn(2, 3, 5, 9)
    mask = topk_blocks(scores, 4)
    assert (mask.sum(-1) == 4).all()
    threshold = scores.sort(dim=-1, descending=True).values[..., 3:4]
    assert torch.equal(mask, scores >= threshold)
    assert topk_blocks(scores, 20).all()  # k beyond the row keeps everything


def test_mass_blocks_keeps_the_fewest_blocks_covering_the_mass():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()[None, None, None]
    assert mass_blocks(logits, 0.45)[0, 0, 0].tolist() == [False, True, False, False]
    assert mass_blocks(logits, 0.75)[0, 0, 0].tolist() == [False, True, False, True]
    assert mass_blocks(logits, 0.85)[0, 0, 0].tolist() == [True, True, False, True]
    assert mass_blocks(logits, 1.0)[0, 0, 0].all()


def brute_block_mass(q, k, block, region_edges):
    """Mean attention probability per block pair; each row's softmax taken within each region."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    probs = torch.cat([logits[..., lo:hi].softmax(-1) for lo, hi in itertools.pairwise(region_edges)], dim=-1)
    n_q, n_k = q.shape[-2], k.shape[-2]
    out = torch.zeros(*q.shape[:2], -(-n_q // block), -(-n_k // block))
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            out[..., i, j] = probs[..., i * block:(i + 1) * block, j * block:(j + 1) * block].mean(dim=(-1, -2))
    return out


@pytest.mark.parametrize("region_starts", [(0,), (0, 2)])
def test_attention_block_mass_is_the_mean_probability_per_block(region_starts):
    q, k = torch.randn(2, 3, 45, 8), torch.randn(2, 3, 70, 8)
    expected = brute_block_mass(q, k, 16, [s * 16 for s in region_starts] + [70])
    got = attention_block_mass(q, k, 16, 16, region_starts=region_starts)
    torch.testing.assert_close(got, expected)
    # Chunking the queries changes nothing.
    chunked = attention_block_mass(q, k, 16, 16, region_starts=region_starts, chunk_elements=1)
    torch.testing.assert_close(chunked, got)


def test_dynamic_selection_returns_one_group_of_all_heads():
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 4, 64, 8)
    (group,) = DynamicBlockSelection(topk=2, block=16)(q, k, layer=0)
    assert group.heads == (0, 1, 2, 3)
    expected = topk_blocks(pooled_block_logits(q, k, 16, 16), 2)
    assert torch.equal(group.layout.mask, expected)
    (group,) = DynamicBlockSelection(mass=0.9, block=16)(q, k, layer=0)
    assert torch.equal(group.layout.mask, mass_blocks(pooled_block_logits(q, k, 16, 16), 0.9))


@pytest.mark.parametrize("call, argument", [
    (lambda: DynamicBlockSelection(), "topk, mass"),
    (lambda: DynamicBlockSelection(topk=2, mass=0.5), "topk, mass"),
    (lambda: DynamicBlockSelection(topk=0), "topk"),
    (lambda: DynamicBlockSelection(mass=1.5), "mass"),
    (lambda: topk_blocks(torch.randn(1, 1, 2, 2), 0), "topk"),
    (lambda: mass_blocks(torch.randn(1, 1, 2, 2), 0.0), "mass"),
    (lambda: pooled_block_logits(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4), 4, 4), "k"),
    (lambda: attention_block_mass(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), 4, 4, region_starts=(1,)),
     "region_starts"),
])
def test_bad_selection_input_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
