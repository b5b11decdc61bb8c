"""build_kernel_layout against a brute-force, element-by-element reading of the same pattern.

CPU masks go through the torch builder; the GPU's Triton builder runs here under the Triton
interpreter (set before triton is first imported) and must give the same lists.
"""

import importlib
import math

import pytest
import torch

from sparta.kernels import build_kernel_layout, layout_block_mask

layout_module = importlib.import_module("sparta.kernels.block_layout")


def brute_force_blocks(block_mask, block_q, block_k, lens_q, lens_k, causal):
    """Per (batch, head, q block, k block): 'full', 'partial' or None, from the element masks.

    A block attends if the block mask says so and at least one of its (query, key) pairs exists in
    the sequences (and is causal); it is full if every pair of the whole block does.
    """
    batch = len(lens_q)
    _, heads, num_q_blocks, num_k_blocks = block_mask.shape
    out = {}
    for b in range(batch):
        for qb in range(num_q_blocks):
            for kb in range(num_k_blocks):
                q = torch.arange(qb * block_q, (qb + 1) * block_q)[:, None]
                k = torch.arange(kb * block_k, (kb + 1) * block_k)[None, :]
                pairs = (q < lens_q[b]) & (k < lens_k[b])
                if causal:
                    pairs = pairs & (q >= k)
                for h in range(heads):
                    listed = bool(block_mask[b % block_mask.shape[0], h, qb, kb]) and bool(pairs.any())
                    out[b, h, qb, kb] = ("full" if pairs.all() else "partial") if listed else None
    return out


def layout_blocks(layout):
    """The same dictionary read from the layout's kv lists."""
    out = {}
    for b in range(layout.batch):
        for h in range(layout.heads):
            for qb in range(layout.num_q_blocks):
                for kb in range(layout.num_k_blocks):
                    out[b, h, qb, kb] = None
                count, full = int(layout.kv_count[b, h, qb]), int(layout.kv_full_count[b, h, qb])
                for pos, kb in enumerate(layout.kv_index[b, h, qb, :count].tolist()):
                    out[b, h, qb, kb] = "full" if pos < full else "partial"
    return out


def transposed_blocks(layout):
    """The same dictionary read from the transposed (q) lists."""
    out = {}
    for b in range(layout.batch):
        for h in range(layout.heads):
            for kb in range(layout.num_k_blocks):
                for qb in range(layout.num_q_blocks):
                    out[b, h, qb, kb] = None
                count, full = int(layout.q_count[b, h, kb]), int(layout.q_full_count[b, h, kb])
                for pos, qb in enumerate(layout.q_index[b, h, kb, :count].tolist()):
                    out[b, h, qb, kb] = "full" if pos < full else "partial"
    return out


@pytest.mark.parametrize("block_q, block_k, seqlen_q, seqlen_k, causal", [
    (32, 32, 256, 256, False),
    (32, 32, 256, 256, True),
    (64, 16, 200, 150, True),   # uneven lengths: the last blocks are partial
    (16, 64, 100, 256, False),
    (128, 128, 1000, 1000, True),
])
def test_layout_matches_brute_force(block_q, block_k, seqlen_q, seqlen_k, causal):
    torch.manual_seed(0)
    num_q_blocks, num_k_blocks = -(-seqlen_q // block_q), -(-seqlen_k // block_k)
    block_mask = torch.rand(2, 3, num_q_blocks, num_k_blocks) < 0.6
    block_mask[0, 1] = True  # a full head
    block_mask[1, 2] = False  # a skipped head
    layout = build_kernel_layout(block_mask, block_q, block_k, seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal)

    expected = brute_force_blocks(block_mask, block_q, block_k, [seqlen_q] * 2, [seqlen_k] * 2, causal)
    assert layout_blocks(layout) == expected
    assert transposed_blocks(layout) == expected
    assert layout.kv_index.dtype == layout.q_index.dtype == layout.kv_count.dtype == torch.int32
    assert layout.kv_index.is_contiguous() and layout.q_index.is_contiguous()
    assert int(layout.kv_count[1, 2].sum()) == 0


def test_round_trip_non_causal_mask():
    torch.manual_seed(1)
    block_mask = torch.rand(1, 4, 8, 8) < 0.3
    layout = build_kernel_layout(block_mask, 32, 32, seqlen_q=256, seqlen_k=256)
    assert torch.equal(layout_block_mask(layout), block_mask)
    assert torch.equal(layout.kv_count, block_mask.sum(-1).int())
    assert torch.equal(layout.kv_full_count, layout.kv_count)  # nothing needs an element mask
    assert torch.equal(layout.q_count, block_mask.sum(-2).int())


def test_launch_order_is_longest_rows_first():
    """Rows by decreasing length class (lengths within sqrt(2) are one class), each class in row order."""
    torch.manual_seed(2)
    block_mask = torch.rand(2, 3, 16, 16) < torch.rand(2, 3, 16, 1)  # rows of very different lengths
    layout = build_kernel_layout(block_mask, 32, 32, seqlen_q=512, seqlen_k=512)
    order = layout.q_block_order.tolist()
    assert sorted(order) == list(range(2 * 3 * 16))
    counts = layout.kv_count.flatten().tolist()
    length_class = [int(2 * math.log2(counts[row] + 1)) for row in order]
    assert length_class == sorted(length_class, reverse=True)
    for earlier, later in zip(order, order[1:]):
        if int(2 * math.log2(counts[earlier] + 1)) == int(2 * math.log2(counts[later] + 1)):
            assert earlier < later


def test_varlen_drops_blocks_past_each_sequence_end():
    torch.manual_seed(3)
    lens_q, lens_k = [50, 128, 7], [96, 20, 128]
    cu_q = torch.tensor([0, 50, 178, 185], dtype=torch.int32)
    cu_k = torch.tensor([0, 96, 116, 244], dtype=torch.int32)
    block_mask = torch.rand(1, 2, 4, 4) < 0.7  # one mask for every sequence
    layout = build_kernel_layout(block_mask, 32, 32, seqlen_q=128, seqlen_k=128, causal=True,
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert layout.batch == 3 and layout.is_varlen
    expected = brute_force_blocks(block_mask, 32, 32, lens_q, lens_k, causal=True)
    assert layout_blocks(layout) == expected
    assert transposed_blocks(layout) == expected


@pytest.mark.parametrize("batch, block_q, block_k, seqlen_q, seqlen_k, causal, varlen", [
    (2, 32, 32, 256, 256, False, False),
    (1, 64, 16, 200, 150, True, False),
    (1, 32, 32, 128, 128, True, True),   # one mask for three packed sequences
    (3, 32, 16, 128, 128, False, True),
])
def test_triton_builder_matches_torch_builder(batch, block_q, block_k, seqlen_q, seqlen_k, causal, varlen):
    torch.manual_seed(4)
    block_mask = torch.rand(batch, 2, -(-seqlen_q // block_q), -(-seqlen_k // block_k)) < 0.5
    cu = (torch.tensor([0, 50, 178, 185], dtype=torch.int32), torch.tensor([0, 96, 116, 244], dtype=torch.int32))
    args = (block_mask, block_q, block_k, seqlen_q, seqlen_k, causal) + (cu if varlen else (None, None))
    kv_lists, q_lists, order = layout_module._build_torch(*args)
    triton_kv_lists, triton_q_lists, triton_order = layout_module._build_triton(*args)
    for name, a, b in zip(("kv_count", "kv_full_count", "kv_index", "q_count", "q_full_count", "q_index",
                           "q_block_order"), kv_lists + q_lists + (order,),
                          triton_kv_lists + triton_q_lists + (triton_order,)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("group, blocks, max_count", [(1, 100, 90), (4, 100, 90), (2, 3, 60)])
def test_launch_order_kernel_matches_longest_first(group, blocks, max_count):
    """The GPU's counting sort (run here under the interpreter) gives longest_first's order of the
    work summed over each group of heads (the dK/dV programs under GQA), over several chunks, also
    when counts exceed the number of blocks per row (more query blocks than key blocks)."""
    torch.manual_seed(5)
    work = (torch.rand(2, 4 * group, blocks) ** 3 * max_count).to(torch.int32)  # many short rows, a few long ones
    work[0, 0, 0] = max_count
    summed = work.view(2, 4, group, blocks).sum(2)
    assert torch.equal(layout_module.launch_order(work, max_count, group),
                       layout_module.longest_first(summed.flatten()))


@pytest.mark.parametrize("kwargs, name", [
    (dict(block_mask=torch.ones(1, 2, 4, 4, dtype=torch.int32)), "block_mask"),
    (dict(block_mask=torch.ones(2, 4, 4, dtype=torch.bool)), "block_mask"),
    (dict(seqlen_q=200), "seqlen_q"),
    (dict(seqlen_k=0), "seqlen_k"),
    (dict(block_q=48), "block_q"),
    (dict(block_k=256), "block_k"),
    (dict(cu_seqlens_q=torch.tensor([0, 128], dtype=torch.int32)), "cu_seqlens_q and cu_seqlens_k"),
    (dict(cu_seqlens_q=torch.tensor([0, 128]), cu_seqlens_k=torch.tensor([0, 128])), "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 64, 128], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 128], dtype=torch.int32)), "cu_seqlens_k"),
])
def test_bad_input_names_the_argument(kwargs, name):
    args = dict(block_mask=torch.ones(1, 2, 4, 4, dtype=torch.bool), block_q=32, block_k=32,
                seqlen_q=128, seqlen_k=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        build_kernel_layout(**args)
