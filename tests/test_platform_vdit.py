"""The video DiT (platform/vdit.py): tile-major tokens that line up with sparta's tile layouts, rotary
angles that follow them, AdaLN-zero, the flow-matching loss and sampler, training on the procedural
source, the MoE variant and the bad input it refuses."""

import re
from dataclasses import asdict

import pytest
import torch

import sparta.attention.module as attention_module
from sparta.attention import BlockLayout, SparseAttention, TileOrder, VideoGrid
from sparta.attention.module import rotary_angles_3d
from sparta.attention.video import tiles
from sparta.moe import MoEConfig
from sparta.platform.noise import EVAL_SEED
from sparta.platform.vdit import (
    VDiTConfig,
    VideoDiT,
    draw_flow_inputs,
    flow_matching_loss,
    interpolate,
    sample,
)
from sparta.platform.video_data import VideoBatches, VideoDataConfig


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread runs them faster than two, and a busy machine's
    waits for a second thread cost a training test tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> VDiTConfig:
    values = dict(frames=8, height=32, width=32, patch=(2, 4, 4), tile=(2, 4, 4), d_model=32, n_layers=2, n_heads=1,
                  attention_backend="dense")
    return VDiTConfig(**{**values, **overrides})


def build(cfg: VDiTConfig, seed: int = 0) -> VideoDiT:
    torch.manual_seed(seed)
    return VideoDiT(cfg)


def coordinate_video(cfg: VDiTConfig) -> torch.Tensor:
    """[1, 3, T, H, W]: channel 0 the frame, 1 the row, 2 the column of the patch each pixel is in."""
    t, h, w = (torch.arange(size) // patch for size, patch in zip((cfg.frames, cfg.height, cfg.width), cfg.patch))
    return torch.stack(torch.broadcast_tensors(t[:, None, None], h[None, :, None], w[None, None, :]))[None].float()


def token_coordinates(model: VideoDiT) -> torch.Tensor:
    """(frame, row, column) [N, 3] of each token as patchify orders them, read from the pixels."""
    tokens = model.patchify(coordinate_video(model.cfg))[0]
    return tokens.view(tokens.shape[0], 3, -1)[:, :, 0].long()


@pytest.mark.parametrize("tile", [(2, 4, 4), (1, 3, 5)])  # a tile that divides the grid, one that leaves edge tiles
def test_unpatchify_inverts_patchify(tile):
    model = build(tiny(tile=tile))
    videos = torch.randn(2, 3, 8, 32, 32)
    tokens = model.patchify(videos)
    assert tokens.shape == (2, 4 * 8 * 8, 3 * 2 * 4 * 4)
    assert torch.equal(model.unpatchify(tokens), videos)


def test_tokens_are_in_the_block_order_of_the_tiles_pattern():
    """With blocks of one tile, `tiles(...)`'s block mask applies to the model's tokens as they are."""
    cfg = tiny()  # token grid 4 x 8 x 8, tiles 2 x 4 x 4 = 32 tokens
    model, grid, block = build(cfg), cfg.grid, 32
    layout = tiles(grid, cfg.tile, window=(1, 2, 1), block=block)
    assert layout.order == model.order == TileOrder(VideoGrid(4, 8, 8), (2, 4, 4))
    f, r, c = token_coordinates(model).unbind(1)
    position = torch.arange(grid.tokens)
    assert torch.equal(position // block, (f // 2 * 2 + r // 4) * 2 + c // 4)  # a token's block is its tile
    raster = (f * grid.height + r) * grid.width + c  # each token's index in raster order
    pairs = layout.element_mask()[0, 0]  # in raster order
    blocks = layout.mask[0, 0]
    assert torch.equal(pairs[raster][:, raster], blocks[position // block][:, position // block])


def test_a_tile_layout_runs_on_the_models_tokens_as_they_are():
    """The tiles pattern's block mask on tile-major tokens (no permutation) gives what the library's
    own path gives on raster tokens (the layout's order, raster 3-D rotary), token for token."""
    grid, tile, block = VideoGrid(4, 8, 8), (2, 4, 4), 32
    layout = tiles(grid, tile, window=(1, 2, 1), block=block).repeat_heads(2)
    raster = SparseAttention(64, 2, rotary="3d", grid=grid, layout=layout, backend="reference")
    in_place = BlockLayout(layout.mask, grid.tokens, grid.tokens, block, block)  # no order: the tokens as they are
    tile_major = SparseAttention(64, 2, rotary="3d", grid=grid, token_order=TileOrder(grid, tile), layout=in_place,
                                 backend="reference")
    tile_major.load_state_dict(raster.state_dict())
    x, order = torch.randn(2, grid.tokens, 64), layout.order.permutation()
    assert (layout.density() < 0.5).all()
    torch.testing.assert_close(tile_major(x[:, order]), raster(x)[:, order])


def test_the_benchmark_grid_is_one_config_away():
    cfg = tiny(frames=13, height=60, width=104, patch=(1, 2, 2), tile=(1, 8, 16), n_layers=1)
    model = build(cfg)
    assert cfg.grid == VideoGrid(13, 30, 52) and cfg.grid.tokens == 20280
    assert torch.equal(model.order.permutation(), tiles(cfg.grid, (1, 8, 16), (1, 3, 3)).order.permutation())
    f, r, c = token_coordinates(model).unbind(1)
    whole = 13 * 3 * 3 * 128  # 117 whole tiles of 128 tokens come first, each one block
    tile = (f * 4 + r // 8) * 4 + c // 16  # over the 13 x 4 x 4 tile grid
    assert torch.equal(torch.arange(whole) // 128, torch.unique_consecutive(tile[:whole], return_inverse=True)[1])
    assert ((r[:whole] < 24) & (c[:whole] < 48)).all() and ((r[whole:] >= 24) | (c[whole:] >= 48)).all()


def test_rotary_angles_follow_each_tokens_true_position(monkeypatch):
    cfg = tiny(tile=(1, 3, 5), d_model=64, n_heads=2)  # head dim 32: 4 frame, 6 row, 6 column pairs; edge tiles
    model, grid = build(cfg), cfg.grid
    seen = []
    original = attention_module.apply_rotary

    def record(x, cos, sin):
        seen.append((cos, sin))
        return original(x, cos, sin)

    monkeypatch.setattr(attention_module, "apply_rotary", record)
    videos = coordinate_video(cfg)
    model.velocity(videos, torch.tensor([0.5]), torch.tensor([0]))
    f, r, c = token_coordinates(model).unbind(1)
    expected = rotary_angles_3d(grid, 32)[(f * grid.height + r) * grid.width + c]
    assert len(seen) == 2 * cfg.n_layers  # q and k of every layer
    for cos, sin in seen:
        torch.testing.assert_close(cos, expected.cos(), rtol=0, atol=0)
        torch.testing.assert_close(sin, expected.sin(), rtol=0, atol=0)
    assert not torch.equal(expected, rotary_angles_3d(grid, 32))  # the order is not raster


def test_adaln_zero_starts_every_block_as_the_identity_and_the_model_at_velocity_zero():
    model = build(tiny())
    x, cond = torch.randn(2, 256, 32), torch.randn(2, 32)
    for block in model.blocks:
        out, aux = block(x, None, None, cond)
        assert torch.equal(out, x) and aux is None
    videos = torch.randn(2, 3, 8, 32, 32)
    assert torch.equal(model.velocity(videos, torch.rand(2), torch.tensor([1, 16])), torch.zeros_like(videos))


def test_init_is_deterministic_per_seed():
    first, second, other = build(tiny()).state_dict(), build(tiny()).state_dict(), build(tiny(), seed=1).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["blocks.0.attention.qkv.weight"], other["blocks.0.attention.qkv.weight"])


def test_flow_matching_loss_is_the_mse_to_noise_minus_data():
    x0, noise = torch.randn(3, 3, 8, 32, 32), torch.randn(3, 3, 8, 32, 32)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    prediction = torch.randn_like(x0)
    expected = ((prediction - (noise - x0)) ** 2).sum() / x0.numel()
    torch.testing.assert_close(flow_matching_loss(prediction, x0, noise), expected)


def test_the_models_loss_is_the_direct_formula_on_its_draws():
    cfg = tiny()
    model = build(cfg).eval()
    torch.nn.init.normal_(model.final.weight, std=0.02)  # a velocity that is not 0
    videos, labels = torch.randn(2, 3, 8, 32, 32), torch.tensor([3, 7])
    loss, metrics = model(videos, labels)
    noise, t, drawn = draw_flow_inputs(videos, labels, 0.0, 16, torch.Generator().manual_seed(EVAL_SEED + 1))
    assert torch.equal(drawn, labels)  # no class dropout in evaluation
    x_t = (1 - t)[:, None, None, None, None] * videos + t[:, None, None, None, None] * noise
    expected = ((model.velocity(x_t, t, labels) - (noise - videos)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == {"loss"} and torch.equal(metrics["loss"], loss.detach())
    model.train().eval()  # a new validation pass draws the same again
    assert torch.equal(model(videos, labels)[0], loss)


def test_timesteps_are_logit_normal_and_dropout_swaps_in_the_null_class():
    x0, labels = torch.zeros(20000, 1), torch.zeros(20000, dtype=torch.long)
    _, t, dropped = draw_flow_inputs(x0, labels, 0.25, 16, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    assert abs((dropped == 16).float().mean() - 0.25) < 0.02 and set(dropped.tolist()) == {0, 16}


class StraightFlow:
    """A velocity field whose flow from any noise ends at `target[label]`: v = (x - target) / t."""

    def __init__(self, targets: torch.Tensor):
        self.targets, self.cfg = targets, VDiTConfig(num_classes=targets.shape[0] - 1)

    def velocity(self, x, t, labels):
        return (x - self.targets[labels]) / t[:, None, None, None, None]


def test_sample_integrates_to_the_target_with_guidance():
    targets = torch.randn(3, 1, 2, 2, 2)  # class 0, class 1 and the null class 2
    noise, labels = torch.randn(2, 1, 2, 2, 2), torch.tensor([0, 1])
    torch.testing.assert_close(sample(StraightFlow(targets), noise, labels, steps=4), targets[labels])
    guided = sample(StraightFlow(targets), noise, labels, steps=4, cfg_scale=3.0)
    torch.testing.assert_close(guided, targets[2] + 3.0 * (targets[labels] - targets[2]))


def test_a_tiny_model_learns_the_procedural_videos():
    cfg = tiny(frames=8, height=16, width=16, patch=(2, 4, 4), tile=(2, 2, 2), d_model=64, n_heads=2)
    data = VideoDataConfig(frames=8, height=16, width=16)
    model = build(cfg)
    train, val = VideoBatches(data, 8, 0, 1), VideoBatches(data, 16, 0, 1, split="val")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(*val.get(0))[0].item()
        model.train()
        return loss

    before = val_loss()
    for step in range(40):
        loss, _ = model(*train.get(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = val_loss()
    assert before > 0.9 and after < 0.6 * before, (before, after)
    videos = sample(model, torch.randn(2, 3, 8, 16, 16), torch.tensor([0, 5]), steps=3, cfg_scale=2.0)
    assert videos.shape == (2, 3, 8, 16, 16) and videos.isfinite().all()


def test_moe_ffn_trains_forward_and_backward():
    moe = MoEConfig(num_experts=4, top_k=2, d_ff=64)
    cfg = tiny(ffn="moe", moe=moe, first_dense_layers=1)
    model = build(cfg)
    for zero_at_init in (model.blocks[1].modulation.weight, model.final.weight):  # else no gradient reaches the experts
        torch.nn.init.normal_(zero_at_init, std=0.02)
    assert model.moe_layers == [1]
    loss, metrics = model(torch.randn(2, 3, 8, 32, 32), torch.tensor([0, 16]))
    loss.backward()
    assert {"loss", "aux_loss", "moe/layers/tls", "moe/layers/expert_load"} <= set(metrics)
    torch.testing.assert_close(loss.detach(), metrics["loss"] + metrics["aux_loss"])
    experts = model.blocks[1].ffn.experts
    assert experts.w_in.grad is not None and experts.w_in.grad.abs().sum() > 0


def test_flops_per_token_counts_the_weights_each_token_goes_through():
    cfg = tiny()
    d, n, tokens, patch = 32, cfg.n_layers, cfg.grid.tokens, 96
    per_layer = 3 * d * d + d * d + 3 * d * cfg.d_ff  # qkv, out, SwiGLU gate/up and down
    expected = 6 * (2 * patch * d + n * per_layer) + 12 * n * d * tokens
    assert build(cfg).flops_per_token(tokens) == expected
    moe = build(tiny(ffn="moe", moe=MoEConfig(num_experts=4, top_k=2, d_ff=64)))
    routed = 4 * d + 2 * 3 * 64 * d  # the router [4, d] and top_k = 2 SwiGLU experts of d_ff 64
    expected_moe = 6 * (2 * patch * d + n * (4 * d * d + routed)) + 12 * n * d * tokens
    assert moe.flops_per_token(tokens) == expected_moe
    assert moe.flops_per_token(tokens, {0: 1.0, 1: 1.0}) == expected_moe - 6 * n * 3 * 64 * d


def test_config_takes_lists_and_round_trips():
    cfg = tiny(patch=[2, 4, 4], tile=[1, 2, 2])
    assert cfg.patch == (2, 4, 4) and VDiTConfig(**asdict(cfg)) == cfg and cfg.family == "vdit"


@pytest.mark.parametrize("overrides, message", [
    ({"height": 30}, "model.height=30: expected a multiple of model.patch[1]=4"),
    ({"frames": 9}, "model.frames=9: expected a multiple of model.patch[0]=2"),
    ({"patch": (2, 4)}, "model.patch=(2, 4): expected three positive ints"),
    ({"tile": (1, 16, 16)}, "model.tile=(1, 16, 16): expected at most the token grid (4, 8, 8)"),
    ({"n_heads": 3}, "model.n_heads=3: expected a divisor of model.d_model=32"),
    ({"ffn": "moe"}, "model.ffn='moe': expected 'dense', or 'moe' together with an MoE config"),
    ({"class_dropout": 1.0}, "model.class_dropout=1.0: expected in [0, 1)"),
    ({"attention_backend": "flash"}, "model.attention_backend='flash'"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(**overrides)


def test_bad_tensors_name_the_tensor_and_the_expected_shape():
    model = build(tiny())
    with pytest.raises(ValueError, match=re.escape("videos: expected a float [B, C, T, H, W] = [B, 3, 8, 32, 32]")):
        model(torch.randn(2, 3, 8, 32, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=re.escape("labels: expected class ids in [0, model.num_classes=16]")):
        model(torch.randn(2, 3, 8, 32, 32), torch.tensor([0, 17]))
    with pytest.raises(ValueError, match=re.escape("labels:")):
        model(torch.randn(2, 3, 8, 32, 32), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=re.escape("t: expected shape (2,) (one time per clip), got (2, 1)")):
        model.velocity(torch.randn(2, 3, 8, 32, 32), torch.rand(2, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        sample(model, torch.randn(1, 3, 8, 32, 32), torch.tensor([0]), steps=0)

