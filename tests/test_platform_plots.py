"""The run pictures: right panels and lines, the data drawn is the data given, PNGs written."""

import numpy as np
import pytest
from matplotlib.collections import QuadMesh

from sparta.platform.plots import cls_by_chunk_size, compare_runs, expert_load_heatmap, save, zero_computation_fraction

STEPS = np.arange(10, 110, 10)
CHUNKS = [2, 4, 8, 16, 32, 64]


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def history(*, moe: bool, zero_computation: bool = False) -> dict:
    decay = np.exp(-STEPS / 50)
    runs = {"train/loss": (STEPS, 3 + 5 * decay), "val/loss": (STEPS[4::5], 3.2 + 5 * decay[4::5]),
            "train/tokens_per_s": (STEPS, np.full(len(STEPS), 5e4)), "train/grad_norm": (STEPS, 1 + decay)}
    if moe:
        runs |= {"moe/tls": (STEPS, 0.9 - 0.1 * decay), "moe/cls8": (STEPS, 0.5 - 0.1 * decay)}
    if zero_computation:
        runs |= {"moe/zero_slot_fraction": (STEPS, np.full(len(STEPS), 0.1)),
                 "moe/copy_slot_fraction": (STEPS, np.full(len(STEPS), 0.05)),
                 "moe/constant_slot_fraction": (STEPS, np.full(len(STEPS), 0.02))}
    return runs


def test_expert_load_heatmap_draws_the_given_load_per_layer(tmp_path):
    load = np.random.default_rng(0).dirichlet(np.ones(8), size=(len(STEPS), 3)) * 2  # top-2: shares sum to 2
    fig = expert_load_heatmap(STEPS, load, ["layer_01", "layer_03", "layer_05"])
    heatmaps = [ax for ax in fig.axes if ax.collections and isinstance(ax.collections[0], QuadMesh)]
    assert len(heatmaps) == 3 and len(fig.axes) == 4  # one shared colour bar
    for index, ax in enumerate(heatmaps):
        assert ax.get_title() == ["layer_01", "layer_03", "layer_05"][index]
        np.testing.assert_array_equal(ax.collections[0].get_array(), load[:, index, :].T)  # expert on y, step on x
    assert fig.get_suptitle() == "expert load"
    assert is_png(save(fig, tmp_path / "load.png"))


def test_expert_load_heatmap_stays_a_grid_for_24_layers_of_64_experts(tmp_path):
    load = np.full((len(STEPS), 24, 64), 8 / 64)
    fig = expert_load_heatmap(STEPS, load, [f"layer_{i:02d}" for i in range(24)])
    assert len(fig.axes) == 25
    width, height = fig.get_size_inches()
    assert width < 16 and height < 20
    mesh = fig.axes[0].collections[0]
    assert len(np.unique(mesh.to_rgba(mesh.get_array()).reshape(-1, 4), axis=0)) == 1  # uniform load: one colour,
    assert mesh.norm(8 / 64) == pytest.approx(0.5)  # mid-scale
    assert is_png(save(fig, tmp_path / "load24.png"))


def test_expert_load_heatmap_names_a_wrong_shape():
    with pytest.raises(ValueError, match=r"load: expected shape \[steps=10, layers=2, experts\], got \[10, 3, 8\]"):
        expert_load_heatmap(STEPS, np.zeros((10, 3, 8)), ["a", "b"])


def test_cls_by_chunk_size_has_a_line_per_layer_and_a_bold_mean(tmp_path):
    cls = np.array([[0.9, 0.8, 0.7, 0.5, 0.3, 0.1], [0.8, 0.6, 0.5, 0.4, 0.2, 0.0]])
    fig = cls_by_chunk_size(CHUNKS, cls, ["layer_01", "layer_03"])
    (ax,) = fig.axes
    *layers, mean = ax.get_lines()
    assert [line.get_label() for line in layers] == ["layer_01", "layer_03"]
    np.testing.assert_allclose(mean.get_ydata(), cls.mean(axis=0))
    assert mean.get_linewidth() > 2 * layers[0].get_linewidth()
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == CHUNKS and ax.get_ylim() == (0.0, 1.0)
    assert is_png(save(fig, tmp_path / "cls.png"))


def test_zero_computation_fraction_sums_the_kinds_on_shared_steps():
    runs = history(moe=True, zero_computation=True)
    runs["moe/copy_slot_fraction"] = (STEPS[:-1], runs["moe/copy_slot_fraction"][1][:-1])
    steps, total = zero_computation_fraction(runs)
    np.testing.assert_array_equal(steps, STEPS[:-1])
    np.testing.assert_allclose(total, 0.17)
    assert zero_computation_fraction(history(moe=True)) is None


def test_compare_runs_panels(tmp_path):
    fig = compare_runs([history(moe=False), history(moe=True), history(moe=True, zero_computation=True)],
                       ["dense", "topk", "moepp"])
    loss, sparsity, speed, last = fig.axes
    assert len(loss.get_lines()) == 6  # train + val per run
    assert len(sparsity.get_lines()) == 4 and len(speed.get_lines()) == 3
    assert last.get_title().startswith("zero-computation") and len(last.get_lines()) == 1
    np.testing.assert_allclose(last.get_lines()[0].get_ydata(), 0.17)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["dense", "topk", "moepp"]
    assert is_png(save(fig, tmp_path / "comparison.png"))


def test_compare_runs_without_moe_metrics_says_so_and_shows_the_gradient_norm():
    _, sparsity, _, last = compare_runs([history(moe=False), history(moe=False)], ["a", "b"]).axes
    assert [text.get_text() for text in sparsity.texts] == ["n/a (no MoE metrics)"]
    assert last.get_title() == "gradient norm" and len(last.get_lines()) == 2
