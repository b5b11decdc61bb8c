"""`launch/compare.py` against a real MLflow SQLite store holding runs logged the way the trainer logs them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from sparta.platform.tracking import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[1]
STEPS = range(10, 210, 10)


def log_run(client, experiment_id, name, moe, ffn, tokens_per_s, zero_computation=False) -> str:
    run_id = client.create_run(experiment_id, run_name=name, tags={RUN_NAME_TAG: name}).info.run_id
    client.log_batch(run_id, params=[Param("choice.moe", moe), Param("model.ffn", ffn), Param("trainer.max_steps", "200")])
    rng = np.random.default_rng(len(name))
    for step in STEPS:
        decay = np.exp(-step / 60)
        metrics = {"train/loss": 3 + 5 * decay, "train/aux_loss": 0.01, "train/lr": 3e-4, "train/grad_norm": 1 + decay,
                   "train/tokens_per_s": tokens_per_s * (0.5 if step <= 90 else 1) + rng.uniform(-1, 1)}
        if ffn == "moe":
            metrics |= {"moe/tls": 0.875 - 0.1 * decay, "moe/cls8": 0.5 - 0.1 * decay,
                        "moe/ffn_experts_per_token": 8 * (0.125 + 0.1 * decay)}
            metrics |= {f"moe/layer_{layer:02d}/{stat}": 0.5 for layer in (1, 3) for stat in ("tls", "load_max", "load_cv")}
        if zero_computation:
            metrics |= {"moe/zero_slot_fraction": 0.1, "moe/copy_slot_fraction": 0.05, "moe/constant_slot_fraction": 0.025}
        if step % 50 == 0:
            metrics["val/loss"] = 3.5 + 5 * decay if step < 200 else 4.0  # the best is not the last
        client.log_batch(run_id, metrics=[Metric(key, float(value), step, step) for key, value in metrics.items()])
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("sparta", artifact_location=(root / "mlartifacts").as_uri())
    topk = log_run(client, experiment_id, "run-topk", "topk", "moe", 1000)
    # A resumed run logs the steps after its last checkpoint again: the later value counts.
    client.log_batch(topk, metrics=[Metric("train/loss", 3.25, 10_000, 200)])
    moepp = log_run(client, experiment_id, "run-moepp", "moepp", "moe", 2000, zero_computation=True)
    dense = log_run(client, experiment_id, "run-dense", "topk", "dense", 3000)
    return uri, client, experiment_id, topk, moepp, dense


def compare(uri, *args):
    return subprocess.run([sys.executable, "launch/compare.py", *args, "--tracking-uri", uri], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_compare_prints_the_table_and_logs_a_comparison_run(store, tmp_path):
    uri, client, experiment_id, topk, moepp, dense = store
    result = compare(uri, "run-topk", moepp, "run-dense", "--out", str(tmp_path))  # run names and a run id
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run-topk", "(topk/moe)", "run-moepp", "(moepp/moe)", "run-dense", "(dense)"]
    rows = {line[:31].strip(): line[31:].split() for line in lines[1:11]}
    assert rows["steps"] == ["200"] * 3
    assert rows["final train/loss"] == ["3.2500"] + [f"{3 + 5 * np.exp(-200 / 60):.4f}"] * 2
    assert rows["best val/loss"] == [f"{3.5 + 5 * np.exp(-150 / 60):.4f}"] * 3
    assert rows["final val/loss"] == ["4.0000"] * 3
    assert rows["tokens/s (mean, last half)"] == ["1,000", "2,000", "3,000"]
    assert rows["final moe/tls"] == [f"{0.875 - 0.1 * np.exp(-200 / 60):.3f}"] * 2 + ["n/a"]
    assert rows["final ZC slot share"] == ["n/a", "0.175", "n/a"]
    assert rows["final train/mfu"] == ["n/a"] * 3
    assert len({len(line) for line in lines[:11]}) == 1  # aligned columns

    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.startswith("| | run-topk (topk/moe) | run-moepp (moepp/moe) | run-dense (dense) |\n|---|---:|---:|---:|\n")
    assert "| final ZC slot share | n/a | 0.175 | n/a |" in markdown
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    (run,) = client.search_runs([experiment_id], "tags.`sparta.kind` = 'comparison'")
    assert run.info.run_name == "compare-run-topk-run-moepp-run-dense" and run.info.status == "FINISHED"
    assert run.data.tags["sparta.compared"] == f"{topk},{moepp},{dense}"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["comparison.md", "comparison.png"]
    assert f"comparison run {run.info.run_id} in experiment 'sparta'" in result.stdout
    assert f"#/experiments/{experiment_id}/runs/{run.info.run_id}" in result.stdout


def test_compare_names_the_run_it_cannot_find(store):
    uri, client, experiment_id, *_ = store
    before = len(client.search_runs([experiment_id]))
    result = compare(uri, "run-topk", "no-such-run")
    assert result.returncode == 2
    assert "not found" in result.stderr and "'no-such-run'" in result.stderr and "'run-topk'" not in result.stderr
    assert len(client.search_runs([experiment_id])) == before
