"""Pattern search: recovers planted per-head structure; plans round-trip and fuse heads; cost model;
q/k/v capture from a model."""

import json

import pytest
import torch
from torch import nn

import sparta.kernels as K
from sparta.attention import (
    CostModel,
    Pattern,
    PatternSearch,
    Plan,
    SparseAttention,
    TileOrder,
    VideoGrid,
    attend,
    calibration_error,
    capture_qkv,
    masked_attention,
)

GRID = VideoGrid(4, 8, 8)  # 256 tokens, blocks of 16: a frame is 4 blocks
STRIPE_KEYS = ((80, 96), (176, 192))  # key blocks 5 and 11


def planted_qkv(seed=0):
    """Four heads of known structure (head dim 64, so q.k / 8 are the logits):
    0 local: logit -(i - j)^2 / 2 (raster distance);  1 temporal: 25 where the spatial positions match;
    2 stripe: 25 on the keys STRIPE_KEYS;  3 all zero."""
    generator = torch.Generator().manual_seed(seed)
    tokens, dim = GRID.tokens, 64
    q, k = torch.zeros(1, 4, tokens, dim), torch.zeros(1, 4, tokens, dim)
    position = torch.arange(tokens, dtype=torch.float32)
    q[0, 0, :, :3] = torch.stack([torch.ones(tokens), position, position ** 2], dim=-1)
    k[0, 0, :, :3] = torch.stack([-4 * position ** 2, 8 * position, -4 * torch.ones(tokens)], dim=-1)
    spatial = torch.arange(tokens) % GRID.frame_size
    q[0, 1, torch.arange(tokens), spatial] = 200.0
    k[0, 1, torch.arange(tokens), spatial] = 1.0
    q[0, 2, :, 0] = 200.0
    for start, end in STRIPE_KEYS:
        k[0, 2, start:end, 0] = 1.0
    v = torch.randn(1, 4, tokens, dim, generator=generator)
    v[0, 3] = 0.0
    return q, k, v


def test_search_recovers_the_planted_pattern_of_each_head():
    search = PatternSearch(GRID, block=16, lam=0.01, cost_model=CostModel(), stripe_blocks=(1, 2, 4),
                           backend="reference")
    for seed in range(2):  # two calibration samples
        search.observe(0, *planted_qkv(seed))
    plan = search.plan()
    local, temporal, stripe, zero = plan.layers[0]
    assert local.name == "diagonal"
    assert temporal.name == "temporal"
    assert stripe == Pattern.of("stripe", keys=STRIPE_KEYS)
    assert zero.name == "skip"
    for head, pattern in enumerate(plan.layers[0]):
        assert plan.stats[0][head]["rel_mse"] < 1e-3
        assert plan.stats[0][head]["density"] == pytest.approx(pattern.build(GRID, block=16).density().item(), abs=1e-4)


def test_search_on_tile_major_tokens_chooses_what_it_chooses_on_raster_tokens():
    """The same calibration tokens in a model's tile-major order: same patterns (stripes name raster keys)."""
    order = TileOrder(GRID, (1, 2, 8))
    perm = order.permutation()
    plans = []
    for token_order in (None, order):
        search = PatternSearch(GRID, block=16, lam=0.01, cost_model=CostModel(), stripe_blocks=(1, 2, 4),
                               backend="reference", token_order=token_order)
        for seed in range(2):
            q, k, v = planted_qkv(seed)
            search.observe(0, *((q, k, v) if token_order is None else (x[:, :, perm] for x in (q, k, v))))
        plans.append(search.plan())
    assert plans[1].layers == plans[0].layers and plans[1].token_order == order
    assert plans[1].layers[0][2] == Pattern.of("stripe", keys=STRIPE_KEYS)


def test_plan_within_an_error_budget_is_the_cheapest_plan_that_meets_it():
    """Each budget's plan keeps its calibration error (root mean rel_mse over heads) within the budget; a
    larger budget never costs more; a zero budget is met by exact heads only."""
    search = PatternSearch(GRID, block=16, cost_model=CostModel(), stripe_blocks=(1, 2, 4), backend="reference")
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, GRID.tokens, 16, generator=generator) for _ in range(3))
    search.observe(0, q, k, v)  # diffuse heads: every pattern but full has an error
    costs = []
    for budget in (0.0, 0.05, 0.2, 1.0):
        plan, lam = search.plan_within(budget)
        errors = [head["rel_mse"] for head in plan.stats[0]]
        assert calibration_error(plan) == pytest.approx((sum(errors) / len(errors)) ** 0.5)
        assert calibration_error(plan) <= budget
        assert plan.layers == search.plan(lam).layers
        costs.append(sum(head["cost"] for head in plan.stats[0]))
    assert costs == sorted(costs, reverse=True) and costs[-1] < costs[0]


def test_plan_round_trips_through_yaml(tmp_path):
    plan = Plan(VideoGrid(2, 4, 8, text=3), 16, {
        0: [Pattern.of("tiles", tile=(1, 2, 8), window=(3, 1, 1)), Pattern.of("skip")],
        2: [Pattern.of("stripe", keys=((0, 3), (10, 20))), Pattern.of("full")]},
        stats={0: [{"rel_mse": 0.01, "cost": 0.3, "density": 0.25}, {"rel_mse": 0.2, "cost": 0.0, "density": 0.0}],
               2: [{"rel_mse": 0.0, "cost": 0.5, "density": 0.5}, {"rel_mse": 0.0, "cost": 1.0, "density": 1.0}]})
    path = tmp_path / "plan.yaml"
    plan.save(path)
    loaded = Plan.load(path)
    assert (loaded.grid, loaded.block, loaded.layers, loaded.stats) == (plan.grid, plan.block, plan.layers, plan.stats)
    text = path.read_text()
    assert "pattern: tiles" in text and "rel_mse: 0.01" in text


@pytest.fixture
def kernel_stand_in(monkeypatch):
    """The contract's pure-torch reference stands in for the Triton kernel."""
    monkeypatch.setattr(K, "block_sparse_attention", K.block_sparse_attention_reference)


def test_loaded_plan_fuses_heads_by_token_order(kernel_stand_in):
    grid = VideoGrid(2, 4, 8)
    tiles_a = Pattern.of("tiles", tile=(1, 2, 8), window=(1, 3, 1))
    tiles_b = Pattern.of("tiles", tile=(1, 4, 4), window=(1, 1, 1))
    patterns = [tiles_a, Pattern.of("diagonal", width=9), tiles_a, Pattern.of("full"), Pattern.of("skip"), tiles_b,
                Pattern.of("spatial", frame_radius=0)]
    plan = Plan(grid, 16, {0: patterns})
    groups = plan.groups(0)
    # One call over every head in the model's order, then one per tile order.
    assert [(g.heads, g.layout.order) for g in groups] == [
        (tuple(range(7)), None), ((0, 2), TileOrder(grid, (1, 2, 8))), ((5,), TileOrder(grid, (1, 4, 4)))]
    main = groups[0].layout.mask[0]
    for head, pattern in enumerate(patterns):
        own = pattern.build(grid, block=16)
        expected = own.mask[0, 0] if own.order is None else torch.zeros_like(main[head])  # no blocks: costs nothing
        assert torch.equal(main[head], expected)
    assert plan.groups(0) is groups  # built once per layer and device

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, grid.tokens, 16, generator=generator) for _ in range(3))
    expected = torch.stack([masked_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1],
                                             p.build(grid, block=16).element_mask())[:, 0]
                            for h, p in enumerate(patterns)], dim=1)
    for backend in ("triton", "reference"):
        torch.testing.assert_close(attend(q, k, v, plan(q, k, 0), backend=backend), expected, atol=1e-5, rtol=1e-5)


def test_a_plan_for_tile_major_tokens_runs_every_head_in_one_call_in_place(kernel_stand_in, tmp_path):
    grid = VideoGrid(2, 4, 8)
    order = TileOrder(grid, (1, 2, 8))
    own, other = (Pattern.of("tiles", tile=(1, 2, 8), window=(1, 1, 1)),
                  Pattern.of("tiles", tile=(1, 4, 4), window=(1, 1, 1)))
    patterns = [own, Pattern.of("diagonal", width=9), Pattern.of("skip"), other, Pattern.of("full")]
    plan = Plan(grid, 16, {0: patterns}, token_order=order)
    plan.save(tmp_path / "plan.yaml")
    loaded = Plan.load(tmp_path / "plan.yaml")
    assert loaded.token_order == order and loaded.layers == plan.layers
    groups = loaded.groups(0)
    assert [(g.heads, g.layout.order) for g in groups] == [(tuple(range(5)), None)]  # no gather, no permutation
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, grid.tokens, 16, generator=generator) for _ in range(3))
    expected = torch.stack([masked_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1],
                                             loaded.layout(p).element_mask())[:, 0]
                            for h, p in enumerate(patterns)], dim=1)
    for backend in ("triton", "reference"):
        torch.testing.assert_close(attend(q, k, v, loaded(q, k, 0), backend=backend), expected, atol=1e-5, rtol=1e-5)


def test_cost_model_interpolates_the_table_and_falls_back_to_flops(tmp_path):
    model = CostModel({"diagonal": [(0.5, 0.6), (0.1, 0.2)]})
    assert model.relative_cost("diagonal", 0.3) == pytest.approx(0.4)
    assert model.relative_cost("diagonal", 0.05) == pytest.approx(0.2)  # clamped below the table
    assert model.relative_cost("diagonal", 1.0) == pytest.approx(1.2)  # proportional above it
    assert model.relative_cost("tiles", 0.3) == pytest.approx(0.3)  # FLOP model
    assert model.relative_cost("skip", 0.0) == 0.0 and model.relative_cost("full", 1.0) == 1.0
    assert CostModel({"full": [(1.0, 1.2)]}).relative_cost("full", 1.0) == pytest.approx(1.2)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"relative_time": {"tiles": [[0.2, 0.5]]}}))
    assert CostModel.load(path).relative_cost("tiles", 0.2) == pytest.approx(0.5)
    assert CostModel.load(tmp_path / "missing.json").table == {}


def test_capture_feeds_every_layer_to_the_search():
    grid = VideoGrid(2, 4, 4)
    torch.manual_seed(0)
    model = nn.Sequential(*[SparseAttention(32, 2, rotary="3d", grid=grid, backend="dense", layer=i) for i in range(2)])
    seen = []
    with torch.no_grad(), capture_qkv(model, lambda layer, q, k, v: seen.append((layer, q.shape, v.shape))):
        model(torch.randn(3, grid.tokens, 32))
    assert seen == [(0, (3, 2, 32, 16), (3, 2, 32, 16)), (1, (3, 2, 32, 16), (3, 2, 32, 16))]
    model(torch.randn(1, grid.tokens, 32))
    assert len(seen) == 2  # hooks removed on exit

    search = PatternSearch(grid, block=16, backend="reference", cost_model=CostModel(), stripe_blocks=())
    with torch.no_grad(), capture_qkv(model, search.observe):
        model(torch.randn(2, grid.tokens, 32))
    plan = search.plan()
    assert sorted(plan.layers) == [0, 1] and all(len(heads) == 2 for heads in plan.layers.values())


@pytest.mark.parametrize("call, argument", [
    (lambda: capture_qkv(nn.Linear(2, 2), print).__enter__(), "model"),
    (lambda: capture_qkv(nn.Sequential(SparseAttention(8, 2), SparseAttention(8, 2)), print).__enter__(), "layer"),
    (lambda: PatternSearch(GRID, backend="dense"), "backend"),
    (lambda: PatternSearch(GRID, lam=-1.0), "lam"),
    (lambda: PatternSearch(GRID, cost_model=CostModel()).plan_within(-0.1), "max_error"),
    (lambda: PatternSearch(GRID, cost_model=CostModel()).plan(), "observe"),
    (lambda: PatternSearch(GRID, cost_model=CostModel()).observe(0, *(torch.zeros(1, 1, 10, 4),) * 3), "q"),
    (lambda: Plan(GRID, 16, {0: [Pattern.of("full")]})(torch.zeros(1, 2, 4, 4), None, 0), "q"),
    (lambda: Plan(GRID, 16, {0: [Pattern.of("full")]})(torch.zeros(1, 1, 4, 4), None, 1), "layer"),
    (lambda: CostModel({"diagonal": []}), "table"),
])
def test_bad_search_input_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_bad_plan_file_is_a_value_error(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("grid: {frames: 2, height: 4, width: 4}\nlayers: {}\n")
    with pytest.raises(ValueError, match="block"):
        Plan.load(path)
    path.write_text("grid: {frames: 2, height: 4, width: 4}\nblock: 16\nlayers: {0: {1: {pattern: skip}}}\n")
    with pytest.raises(ValueError, match="layers"):
        Plan.load(path)
