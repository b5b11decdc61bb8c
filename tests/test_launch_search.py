"""`launch/search.py` on a tiny video DiT checkpoint (random weights, laid out as the trainer writes it) in a
real MLflow SQLite store: the plan covers every layer and head, runs on the model's tile-major tokens, and
lands in the run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vdit_runs import STEP, make_run

import sparta.kernels as K
from sparta.attention import Plan, attend, calibration_error, masked_attention
from sparta.platform.checkpoint import MODEL_FILE, STATE_FILE
from sparta.platform.runs import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An MLflow run whose Ray storage directory holds one checkpoint of the tiny model."""
    return make_run(tmp_path_factory.mktemp("cluster"), "vdit-search")


def search(uri, *args):
    return subprocess.run([sys.executable, "launch/search.py", *args, "--tracking-uri", uri], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_search_writes_a_plan_for_every_layer_and_head_and_logs_it(run, tmp_path, monkeypatch):
    uri, client, run_id, checkpoint = run
    out = tmp_path / "search"
    result = search(uri, run_id, "clips=2", "times=[0.3,0.7]", "lam=0.5", f"out={out}")  # lam: sparse choices
    assert result.returncode == 0, result.stderr
    assert "predicted attention speed-up" in result.stdout

    plan = Plan.load(out / "plan.yaml")
    model, _ = load_model(checkpoint)
    heads = model.cfg.n_heads
    assert sorted(plan.layers) == list(range(model.cfg.n_layers))
    assert all(len(patterns) == heads for patterns in plan.layers.values())
    assert (plan.grid, plan.block, plan.token_order) == (model.cfg.grid, 16, model.order)

    # The plan on tile-major tokens (the kernel path, its pure-torch stand-in) = masked attention.
    monkeypatch.setattr(K, "block_sparse_attention", K.block_sparse_attention_reference)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, plan.grid.tokens, 16, generator=generator) for _ in range(3))
    for layer, patterns in plan.layers.items():
        expected = torch.stack([masked_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1],
                                                 plan.layout(p).element_mask())[:, 0] for h, p in enumerate(patterns)],
                               dim=1)
        for backend in ("triton", "reference"):
            torch.testing.assert_close(attend(q, k, v, plan(q, k, layer), backend=backend), expected,
                                       atol=1e-5, rtol=1e-5)

    assert any(p.name != "full" for patterns in plan.layers.values() for p in patterns)
    # ... and in the model: the kernel path (tokens permuted per head group) = the element masks.
    for block in model.blocks:
        block.attention.core.layout = plan
    x_t, t, labels = torch.randn(2, 3, 2, 16, 32, generator=generator), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    with torch.no_grad():
        velocities = []
        for backend in ("triton", "reference"):
            for block in model.blocks:
                block.attention.core.backend = backend
            velocities.append(model.velocity(x_t, t, labels))
    torch.testing.assert_close(*velocities, atol=1e-5, rtol=1e-5)

    artifacts = {a.path for a in client.list_artifacts(run_id, "search")}
    assert artifacts == {"search/plan.yaml", "search/layouts"}
    pictures = {a.path for a in client.list_artifacts(run_id, "search/layouts")}
    assert pictures == {f"search/layouts/layer_{layer:02d}.png" for layer in plan.layers}
    [speedup] = client.get_metric_history(run_id, "search/predicted_speedup")
    assert speedup.step == STEP and speedup.value > 0
    assert client.get_metric_history(run_id, "search/lam")[-1].value == 0.5

    # an error budget instead of lam: the cheapest plan within it (tests/test_attention_search.py), logged
    budget = search(uri, run_id, "clips=1", "times=[0.5]", "max_error=0.3", f"out={tmp_path / 'budget'}")
    assert budget.returncode == 0, budget.stderr
    within = Plan.load(tmp_path / "budget" / "plan.yaml")
    logged = client.get_metric_history(run_id, "search/calibration_error")[-1].value
    assert logged == pytest.approx(calibration_error(within), abs=1e-6) and logged <= 0.3


def test_bad_input_names_the_argument(run, tmp_path):
    uri, _, _, _ = run
    missing = search(uri, str(tmp_path / "no-such-checkpoint"))
    assert missing.returncode == 2 and "no-such-checkpoint" in missing.stderr
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / MODEL_FILE).write_bytes(b"")
    (lm / STATE_FILE).write_text(json.dumps({"model_config": {"family": "lm"}}))
    other = search(uri, str(lm))
    assert other.returncode == 2 and "model.family=lm" in other.stderr and str(lm) in other.stderr
    bad_key = search(uri, str(lm), "block=24")
    assert bad_key.returncode == 2 and "block=24" in bad_key.stderr
    bad_budget = search(uri, str(lm), "max_error=-1")
    assert bad_budget.returncode == 2 and "max_error=-1" in bad_budget.stderr
