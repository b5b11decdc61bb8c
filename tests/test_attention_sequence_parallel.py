"""SparseAttention with a sequence_group (DeepSpeed-Ulysses) == one process with every token and head.

For P = 2 and P = 4 gloo ranks (one spawn per P, every case inside it), each rank builds the
single-process module and the sequence-parallel one with the same weights, runs the first on the
whole sequence and the second on its shard, and checks its output and input gradient against its
shard of the reference, and every weight gradient summed over the ranks (as the trainer reduces
replicated weights) against the reference's. Tolerance (fp32): max abs error <= 1e-5 * max abs
reference value. The cases cover SDPA, rotary 1-D and 3-D (global positions), GQA, and each layout
provider on the "reference" backend with a different pattern per head: a BlockLayout, a Plan (a
tile-reordered head among them), SparseD's cached masks and the dynamic top-k selection.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_cases import join_process_group

from sparta.attention import (
    BlockLayout,
    DynamicBlockSelection,
    Pattern,
    Plan,
    SparseAttention,
    SparseAttentionCore,
    SparseDSchedule,
    VideoGrid,
    capture_qkv,
    heads_to_sequence,
    sequence_shard,
    sequence_to_heads,
)

GRID = VideoGrid(2, 4, 4, text=4)  # 36 tokens: 18 per rank for P = 2, 9 for P = 4
BLOCK = 8  # 5 blocks, the last one short
HEAD_DIM = 8


def _block_layout(heads: int, seed: int) -> BlockLayout:
    """A random mask per head (plus the diagonal, so that no query block is empty)."""
    blocks = -(-GRID.tokens // BLOCK)
    mask = torch.rand(1, heads, blocks, blocks, generator=torch.Generator().manual_seed(seed)) < 0.4
    return BlockLayout(mask | torch.eye(blocks, dtype=torch.bool), GRID.tokens, GRID.tokens, BLOCK, BLOCK)


def _plan() -> Plan:
    patterns = [Pattern.of("diagonal", width=5), Pattern.of("tiles", tile=(1, 2, 4), window=(1, 1, 1)),
                Pattern.of("stripe", keys=GRID.frame_keys(1)), Pattern.of("skip")]
    return Plan(GRID, BLOCK, {0: patterns})


ROTARY_1D = dict(rotary="1d", max_tokens=GRID.tokens)
# name -> (SparseAttention keywords, a new layout provider for each module); heads and kv heads divide by 4.
CASES = {
    "dense": (dict(num_heads=4, backend="dense"), lambda: None),
    "rotary-1d": (dict(num_heads=4, **ROTARY_1D), lambda: None),
    "rotary-3d": (dict(num_heads=4, rotary="3d", grid=GRID), lambda: None),
    "gqa": (dict(num_heads=8, num_kv_heads=4, **ROTARY_1D), lambda: None),
    "block-layout": (dict(num_heads=4, **ROTARY_1D, backend="reference"), lambda: _block_layout(4, seed=1)),
    "gqa-block-layout": (dict(num_heads=8, num_kv_heads=4, backend="reference"), lambda: _block_layout(8, seed=2)),
    "plan": (dict(num_heads=4, rotary="3d", grid=GRID, backend="reference"), _plan),
    "sparsed": (dict(num_heads=4, **ROTARY_1D, backend="reference"),
                lambda: SparseDSchedule(2, skip_ratio=0.5, keep_ratio=0.5, block=BLOCK, prompt_len=12)),
    "dynamic": (dict(num_heads=8, num_kv_heads=4, backend="reference"),
                lambda: DynamicBlockSelection(topk=2, block=BLOCK)),
}


def _close(actual, expected, what):
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0 and error <= 1e-5 * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def _layout_of(module: SparseAttention) -> torch.Tensor:
    """The mask a SparseDSchedule cached for the module's layer (its heads only)."""
    return module.core.layout(None, None, module.core.layer)[0].layout.mask


def _check_case(name, group):
    keywords, provider = CASES[name]
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    dim = keywords["num_heads"] * HEAD_DIM
    torch.manual_seed(0)
    full = SparseAttention(dim, layout=provider(), **keywords)
    parallel = SparseAttention(dim, layout=provider(), sequence_group=group, **keywords)
    parallel.load_state_dict(full.state_dict())
    for module in (full, parallel):
        if isinstance(module.core.layout, SparseDSchedule):
            module.core.layout.step = 1  # past the switch step: the sparse masks
    x_all, grad_all = torch.randn(2, GRID.tokens, dim), torch.randn(2, GRID.tokens, dim)
    x_ref = x_all.clone().requires_grad_()
    y_ref = full(x_ref)
    (y_ref * grad_all).sum().backward()

    x = sequence_shard(x_all, group).clone().requires_grad_()
    y = parallel(x)
    (y * sequence_shard(grad_all, group)).sum().backward()

    _close(y, sequence_shard(y_ref, group), f"{name}, {ranks} ranks: output")
    _close(x.grad, sequence_shard(x_ref.grad, group), f"{name}, {ranks} ranks: dx")
    for (param_name, p), expected in zip(parallel.named_parameters(), full.parameters()):
        summed = p.grad.clone()
        dist.all_reduce(summed, group=group)
        _close(summed, expected.grad, f"{name}, {ranks} ranks: {param_name}")
    if name == "sparsed":  # the rank's heads got exactly their single-process masks
        local = keywords["num_heads"] // ranks
        assert torch.equal(_layout_of(parallel), _layout_of(full)[:, rank * local:(rank + 1) * local])


def _check_bad_input(group):
    ranks = dist.get_world_size(group)
    with pytest.raises(ValueError, match=r"sequence_group: .*num_heads=6 and num_kv_heads=3 .*multiples of"):
        SparseAttention(48, 6, num_kv_heads=3, sequence_group=group)  # 3 kv heads (P = 2), 6 heads (P = 4)
    video = SparseAttention(32, 4, rotary="3d", grid=GRID, sequence_group=group)
    with pytest.raises(ValueError, match=f"x: 8 tokens on each of {ranks} sequence-parallel ranks, the grid"):
        video(torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match="x: 35 tokens"):
        sequence_shard(torch.randn(1, 35, 4), group)
    with pytest.raises(ValueError, match=r"x: expected \[B, H, N/P, D\] with H divisible"):
        sequence_to_heads(torch.randn(1, 3, 4, 2), group)
    with pytest.raises(ValueError, match=r"x: expected \[B, H/P, N, D\] with N divisible"):
        heads_to_sequence(torch.randn(1, 1, 5, 2), group)
    with pytest.raises(ValueError, match="sequence_group"), capture_qkv(video, lambda *args: None):
        pass


def _check_one_rank_group_is_the_plain_module(rank, ranks):
    """A group of one rank changes nothing: same output, bit for bit."""
    own = [dist.new_group([r]) for r in range(ranks)][rank]  # every rank creates every group
    torch.manual_seed(0)
    plain = SparseAttention(32, 4, rotary="3d", grid=GRID, layout=_plan(), backend="reference")
    alone = SparseAttention(32, 4, rotary="3d", grid=GRID, layout=_plan(), backend="reference", sequence_group=own)
    alone.load_state_dict(plain.state_dict())
    x = torch.randn(2, GRID.tokens, 32)
    assert alone.sequence_group is None and alone.core.heads is None
    assert torch.equal(alone(x), plain(x))


def _worker(rank, init_file, ranks):
    join_process_group(rank, init_file, ranks, "gloo")
    torch.set_num_threads(1)
    try:
        for name in CASES:
            _check_case(name, dist.group.WORLD)
        _check_bad_input(dist.group.WORLD)
        _check_one_rank_group_is_the_plain_module(rank, ranks)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ranks", [2, 4])
def test_sequence_parallel_matches_single_process(tmp_path, ranks):
    mp.spawn(_worker, args=(str(tmp_path / "init"), ranks), nprocs=ranks, join=True)


def test_a_core_cuts_a_layout_set_later_to_its_heads():
    """Heads 2 and 3 of a layer on their own (as on rank 1 of 2) get the patterns of global heads 2, 3,
    also when the layout is assigned after construction (as the dLM's `use_attention` does)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, GRID.tokens, HEAD_DIM, generator=generator) for _ in range(3))
    for layout in (_block_layout(4, seed=3), _plan()):
        core = SparseAttentionCore(backend="reference", heads=range(2, 4))
        core.layout = layout
        everything = SparseAttentionCore(layout, backend="reference")(q, k, v)
        torch.testing.assert_close(core(q[:, 2:], k[:, 2:], v[:, 2:]), everything[:, 2:], atol=1e-6, rtol=1e-6)
        assert not torch.equal(everything[:, 2], everything[:, 3])  # the two heads do differ
    assert _plan().select_heads(range(1, 3)).layers[0] == _plan().layers[0][1:3]


@pytest.mark.parametrize("layout", [_block_layout(4, seed=4), _plan()])
def test_select_heads_out_of_range_is_a_value_error_naming_heads(layout):
    with pytest.raises(ValueError, match="heads: expected indices"):
        layout.select_heads(range(3, 5))
