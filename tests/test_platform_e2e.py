"""The main job end to end through `launch/train.py`: real Ray, real DeepSpeed, real MLflow, on 2 CPU workers.

Each run trains the `smoke` experiment (a 2-layer model, 30 steps, checkpoints every 10 steps).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from e2e_helpers import REPO, checkpoints, free_port, history, mlflow_runs, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept_store(tmp_path_factory) -> Path:
    """A Hydra sweep over ZeRO-1 and ZeRO-2: two complete training runs in one MLflow store."""
    root = tmp_path_factory.mktemp("sweep")
    train(root, "deepspeed=zero1,zero2", multirun=True)
    return root


def test_sweep_trains_zero1_and_zero2_and_records_everything(swept_store):
    client, runs = mlflow_runs(swept_store)
    assert len(runs) == 2
    stages = set()
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        stages.add(run.data.params["deepspeed.zero_stage"])
        assert run.data.params["choice.model"] == "tiny" and run.data.params["trainer.max_steps"] == "30"
        assert run.data.tags["system.world_size"] == "2" and run.data.tags["system.device"] == "cpu"
        val = history(client, run.info.run_id, "val/loss")
        assert sorted(val) == [10, 20, 30]
        assert val[30][0] < val[10][0] - 0.3, val  # the model learns
        for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
            assert sorted(history(client, run.info.run_id, key)) == [5, 10, 15, 20, 25, 30], key
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "loss_curve.png"}
        kept = checkpoints(swept_store, name)
        assert len(kept) == 2  # trainer.keep_checkpoints
        final = kept[-1]
        assert json.loads((final / "state.json").read_text())["step"] == 30
        assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert stages == {"1", "2"}


def test_worker_failure_restarts_from_the_checkpoint_with_the_same_losses(tmp_path):
    output = train(tmp_path, "run_name=drill", "trainer.log_every=1", "trainer.inject_failure_at_step=15",
                   "deepspeed.gradient_accumulation_steps=2")
    assert "injected failure" in output and "resumed from the checkpoint at step 10" in output
    client, runs = mlflow_runs(tmp_path)
    run = runs["drill"]
    assert run.info.status == "FINISHED"
    loss = history(client, run.info.run_id, "train/loss")
    for step in range(11, 15):  # logged before the failure and again after the restart
        first, second = loss[step]
        assert second == pytest.approx(first, rel=1e-6), step
    assert len(loss[15]) == 1 and sorted(loss)[-1] == 30


def test_relaunch_resumes_the_run_and_its_mlflow_record_zero3(tmp_path):
    args = ("run_name=again", "deepspeed=zero3", "trainer.log_every=1", "trainer.inject_failure_at_step=13",
            "trainer.max_failures=0")
    output = train(tmp_path, *args, ok=False)
    assert "injected failure" in output
    client, runs = mlflow_runs(tmp_path)
    assert runs["again"].info.status == "FAILED"
    assert (tmp_path / "ray" / "again" / "injected_failure_step_13").exists()

    output = train(tmp_path, *args)  # the same command again: the drill does not fire twice
    assert "resumed from the checkpoint at step 10" in output
    client, runs = mlflow_runs(tmp_path)
    assert list(runs) == ["again"] and runs["again"].info.status == "FINISHED"
    loss = history(client, runs["again"].info.run_id, "train/loss")
    for step in (11, 12):
        first, second = loss[step]
        assert second == pytest.approx(first, rel=1e-6), step
    assert sorted(loss) == list(range(1, 31))


def test_ray_job_submit_to_a_local_cluster(tmp_path):
    """`ray start --head`, then `ray job submit --working-dir .` (token auth on) of the stdlib check and of
    a training job (ZeRO-0) whose MLflow server cannot be reached: both succeed, the cluster is stopped."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([ray, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                    "--num-cpus=2", "--disable-usage-stats"], check=True, capture_output=True, timeout=180)
    try:
        def submit(*entrypoint: str) -> str:
            proc = subprocess.run([ray, "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                                   "--working-dir", str(REPO), "--", *entrypoint],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0 and "succeeded" in output, output[-6000:]
            return output

        stdlib = sysconfig.get_paths()["stdlib"]  # the job runs this same interpreter
        check = "import platform; print('platform from', platform.__file__)"
        assert f"platform from {stdlib}" in submit(sys.executable, "-c", check)
        output = submit(sys.executable, "launch/train.py", "cluster=ray", "experiment=smoke", f"cluster.root={tmp_path}",
                        "run_name=submitted", "deepspeed=zero0", "trainer.max_steps=6", "trainer.eval_every=3",
                        "trainer.checkpoint_every=3", "tracking.uri=http://127.0.0.1:9")
        assert output.count("training continues without tracking") == 1
        assert "run submitted finished at step 6" in output
        assert "step 6/6 | loss" in output and "| grad " in output
        assert json.loads((checkpoints(tmp_path, "submitted")[-1] / "state.json").read_text())["step"] == 6
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def test_mlflow_ui_shows_the_runs(swept_store, tmp_path):
    """`mlflow server` on the job's store lists the runs through its REST API and serves the UI page;
    with Chromium installed, a headless screenshot of the experiment page is taken and must not be blank."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{swept_store / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
                time.sleep(1)
        experiment = json.load(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sparta", timeout=10))["experiment"]
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                                         headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(request, timeout=10))["runs"]
        assert {run["info"]["status"] for run in runs} == {"FINISHED"} and len(runs) == 2
        assert "<title>MLflow</title>" in urllib.request.urlopen(base, timeout=10).read().decode()

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            shot = tmp_path / "mlflow.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000",
                            "--virtual-time-budget=60000", f"--screenshot={shot}",
                            f"{base}/#/experiments/{experiment['experiment_id']}/runs"],
                           capture_output=True, timeout=120)
            import matplotlib.image

            pixels = matplotlib.image.imread(shot)
            assert pixels.std() > 0.05, "the screenshot is blank"
    finally:
        server.terminate()
        server.wait(timeout=30)
