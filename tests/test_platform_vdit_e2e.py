"""The Sparse-vDiT workflow through the main job (real Ray, DeepSpeed, MLflow, 2 CPU workers) on the
procedural video source: train dense (the flow-matching validation loss drops, tokens/s counts a
clip's patches), search a plan on the trained model, fine-tune from the dense weights with the plan."""

import json
import subprocess
import sys

import pytest
from e2e_helpers import REPO, checkpoints, history, mlflow_runs, train

from sparta.attention import Plan

pytestmark = pytest.mark.slow


def test_video_dit_trains_dense_then_fine_tunes_with_its_searched_plan(tmp_path):
    output = train(tmp_path, "run_name=vdit", "trainer.activation_checkpointing=true", experiment="vdit_smoke")
    assert "(ppl" not in output  # a flow-matching loss is not a cross-entropy
    client, runs = mlflow_runs(tmp_path)
    run = runs["vdit"]
    assert run.data.params["model.family"] == "vdit" and run.data.params["data.tokens_per_clip"] == "256"
    val = history(client, run.info.run_id, "val/loss")
    assert sorted(val) == [10, 20, 30]
    assert val[30][0] < 0.95 * val[10][0], val  # the same validation draws at every evaluation
    assert all(v[0] > 0 for v in history(client, run.info.run_id, "train/tokens_per_s").values())
    (last,) = checkpoints(tmp_path, "vdit")[-1:]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 30 and state["model_config"]["family"] == "vdit" and state["seq_len"] == 256

    plan = tmp_path / "plan" / "plan.yaml"
    subprocess.run([sys.executable, "launch/search.py", "vdit", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "lam=2", "clips=2", f"out={plan.parent}"], cwd=REPO, check=True, capture_output=True)
    patterns = [str(p) for heads in Plan.load(plan).layers.values() for p in heads]
    assert any(not p.startswith("full") for p in patterns), patterns  # sparse heads to fine-tune with
    output = train(tmp_path, "run_name=sparse", "trainer.init_from=vdit", f"model.plan={plan}",
                   "model.attention_backend=reference", "trainer.max_steps=5", "trainer.eval_every=5",
                   "trainer.log_every=1", experiment="vdit_smoke")
    assert "(trainer.init_from); optimizer and step start fresh" in output
    client, runs = mlflow_runs(tmp_path)
    sparse = history(client, runs["sparse"].info.run_id, "train/loss")
    dense = history(client, run.info.run_id, "train/loss")
    assert sparse[1][0] < dense[5][0] - 0.05, (sparse, dense)  # it starts where the dense run got to
