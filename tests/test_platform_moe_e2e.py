"""MoE language models through `launch/train.py` (real Ray, DeepSpeed, MLflow, 2 CPU workers): the three
routers train and log per-layer sparsity; expert parallelism trains the same losses as data parallelism;
a checkpoint resumes at another expert-parallel size and ZeRO stage; export and eval read the run."""

import json
import subprocess
import sys

import pytest
from e2e_helpers import REPO, checkpoints, history, mlflow_runs, train

pytestmark = pytest.mark.slow

# Losses of two layouts agree to float32 reduction order: all-to-all vs local experts, sums over
# different groups. Measured differences are ~1e-6 relative; 1e-4 leaves room and still catches any
# real mismatch (a wrong gradient scale or a missing expert moves the loss by > 1e-3 within a few steps).
LAYOUT_RTOL = 1e-4


@pytest.mark.parametrize("router", ["topk", "blockffn", "moepp"])
def test_moe_lm_trains_and_logs_per_layer_sparsity(tmp_path, router):
    output = train(tmp_path, f"moe={router}", f"run_name={router}", experiment="smoke_moe")
    assert " | tls " in output and " cls8 " in output  # the console line shows the sparsity
    client, runs = mlflow_runs(tmp_path)
    run = runs[router]
    val = history(client, run.info.run_id, "val/loss")
    assert val[30][0] < val[10][0] - 0.3, val
    metrics = run.data.metrics
    for layer in ("layer_00", "layer_01"):
        for stat in ("tls", "cls2", "cls8", "cls64", "ffn_experts_per_token", "load_max", "load_min", "load_cv",
                     "router_entropy", "dropped_fraction"):
            assert f"moe/{layer}/{stat}" in metrics, (layer, stat)
    assert 0 <= metrics["moe/tls"] <= 1 and metrics["moe/cls64"] <= metrics["moe/cls2"]
    assert metrics["train/aux_loss"] > 0
    if router == "topk":  # 2 of 4 experts per token, dropless
        assert metrics["moe/ffn_experts_per_token"] == pytest.approx(2.0) and metrics["moe/tls"] == pytest.approx(0.5)
    if router == "moepp":
        assert {"moe/zero_fraction", "moe/copy_fraction", "moe/constant_fraction"} <= set(metrics)
    if router == "blockffn":
        assert "moe/chunk_sparsity_coef" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"expert_load.png", "cls_by_chunk_size.png", "loss_curve.png"} <= artifacts


def test_a_data_expert_sequence_layout_of_four_workers_trains_the_losses_of_one(tmp_path):
    """4 CPU workers as 1 data x 2 expert x 2 sequence (each pair reads the same 2 samples and splits
    every sequence; the pair's experts are split too), with activation checkpointing, against one
    worker reading the same 4 samples. The auxiliary losses are off: they are per-shard statistics."""
    common = ("moe.load_balance_coef=0", "moe.z_loss_coef=0", "trainer.max_steps=8", "trainer.log_every=1",
              "trainer.eval_every=8", "trainer.checkpoint_every=8", "deepspeed.optimizer.lr=3e-3",
              "deepspeed.lr_schedule.warmup_steps=1")
    train(tmp_path, *common, "run_name=one", "trainer.num_workers=1", "deepspeed.micro_batch_size=4",
          experiment="smoke_moe")
    output = train(tmp_path, *common, "run_name=grid", "trainer.num_workers=4", "trainer.cpus_per_worker=0.5",
                   "parallel.expert=2", "parallel.sequence=2", "deepspeed.micro_batch_size=2",
                   "trainer.activation_checkpointing=true", experiment="smoke_moe")
    assert "4 CPU workers (data 1 x expert 2 x sequence 2)" in output
    client, runs = mlflow_runs(tmp_path)
    for key in ("train/loss", "val/loss"):
        reference = history(client, runs["one"].info.run_id, key)
        got = history(client, runs["grid"].info.run_id, key)
        assert sorted(got) == sorted(reference), key
        for step in reference:
            assert got[step][0] == pytest.approx(reference[step][0], rel=LAYOUT_RTOL), (key, step)
    losses = history(client, runs["one"].info.run_id, "train/loss")
    assert losses[8][0] < losses[1][0] - 0.05  # the weights move: equal losses mean equal updates


def test_expert_parallel_resumes_across_layouts_with_the_same_losses(tmp_path):
    """A run at EP=2 (ZeRO-2) trains the losses of EP=1; checkpointed, it resumes at EP=1 (ZeRO-1), and
    that one's checkpoint at EP=2 under ZeRO-3, each continuing the uninterrupted EP=1 run's loss curve."""
    common = ("moe=moepp", "trainer.max_steps=15", "trainer.checkpoint_every=5",
              "trainer.log_every=1", "trainer.eval_every=15", "deepspeed.lr_schedule.name=warmup_constant")
    train(tmp_path, *common, "run_name=ep1", "parallel.expert=1", experiment="smoke_moe")
    drill = (*common, "run_name=moved", "trainer.max_failures=0")
    train(tmp_path, *drill, "parallel.expert=2", "trainer.inject_failure_at_step=7", ok=False, experiment="smoke_moe")
    output = train(tmp_path, *drill, "parallel.expert=1", "deepspeed=zero1", "trainer.inject_failure_at_step=12", ok=False,
                   experiment="smoke_moe")
    assert "resumed from the checkpoint at step 5" in output
    output = train(tmp_path, *drill, "parallel.expert=2", "deepspeed=zero3", experiment="smoke_moe")
    assert "resumed from the checkpoint at step 10" in output

    client, runs = mlflow_runs(tmp_path)
    reference = history(client, runs["ep1"].info.run_id, "train/loss")
    assert sorted(reference) == list(range(1, 16))
    assert reference[15][0] < reference[1][0] - 0.5  # it trains
    losses = history(client, runs["moved"].info.run_id, "train/loss")
    for step in range(1, 16):
        # EP=2 for steps 1-7 and (ZeRO-3) 11-15, EP=1 for 6-12 (the resumed launches re-run 6-7 and 11-12):
        # each value equals the reference
        for value in losses[step]:
            assert value == pytest.approx(reference[step][0], rel=LAYOUT_RTOL), step

    # export the run (consolidated experts) and evaluate it: the same validation loss as training's last eval
    export_dir = tmp_path / "export"
    subprocess.run([sys.executable, "launch/export.py", "moved", "--out", str(export_dir),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=REPO, check=True, capture_output=True)
    assert {p.name for p in export_dir.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert json.loads((export_dir / "config.json").read_text())["step"] == 15
    proc = subprocess.run([sys.executable, "launch/eval.py", str(export_dir), "--batches", "8", "--batch-size", "4"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    run_id = runs["moved"].info.run_id
    evaluated = history(client, run_id, "eval/loss")
    assert list(evaluated) == [15]
    assert evaluated[15][0] == pytest.approx(history(client, run_id, "val/loss")[15][-1], rel=1e-4)
    assert "eval/moe/zero_fraction" in client.get_run(run_id).data.metrics
    assert checkpoints(tmp_path, "moved")
