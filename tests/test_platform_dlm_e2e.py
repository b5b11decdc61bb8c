"""The masked diffusion LM through `launch/train.py` (real Ray, DeepSpeed, MLflow, 2 CPU workers), then
`launch/generate.py` from its MLflow run id, dense and SparseD (the reference path on CPU)."""

import subprocess
import sys

import pytest
from e2e_helpers import REPO, checkpoints, history, mlflow_runs, train

pytestmark = pytest.mark.slow


def test_diffusion_lm_trains_then_samples_dense_and_sparsed_from_its_run(tmp_path):
    train(tmp_path, "run_name=dlm", experiment="dlm_smoke")
    client, runs = mlflow_runs(tmp_path)
    run = runs["dlm"]
    assert run.data.params["model.family"] == "dlm"
    val = history(client, run.info.run_id, "val/loss")
    assert sorted(val) == [10, 20, 30, 40]
    assert val[40][0] < val[10][0] - 0.3, val  # the bound drops (same noise draws at every evaluation)
    assert checkpoints(tmp_path, "dlm")

    command = [sys.executable, "launch/generate.py", run.info.run_id, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "prompt_tokens=48", "gen_len=16", "block_len=8", "steps=8", "samples=2", "attention=sparsed",
               "sparsed.block=16", "sparsed.keep_ratio=0.5"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "denoising (sparsed)" in proc.stderr and "=== sample 1: answer ===" in proc.stdout

    metrics = client.get_run(run.info.run_id).data.metrics
    for attention in ("dense", "sparsed"):
        assert metrics[f"generate/{attention}/tokens_per_s"] > 0
        assert sorted(history(client, run.info.run_id, f"generate/{attention}/step_ms")) == list(range(1, 9))
    # 8 steps, the first ceil(0.2 * 8) = 2 dense; then 4 key blocks per query block: the 3 prompt
    # blocks keep 2, the answer block keeps 1
    assert metrics["generate/sparsed/block_fraction"] == pytest.approx((2 + 6 * 3 / 4) / 8)
    assert 0 <= metrics["generate/sparsed/agreement"] <= 1 and metrics["generate/sparsed/speedup"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "generate")}
    assert artifacts == {"generate/samples-dense.txt", "generate/samples-sparsed.txt"}
