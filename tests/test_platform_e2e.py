"""The main job end to end through `launch/train.py`: real Ray, real DeepSpeed, real MLflow, on 2 CPU workers.

Each run trains the `smoke` experiment (a 2-layer model, 30 steps, checkpoints every 10 steps).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from e2e_helpers import REPO, checkpoints, free_port, history, mlflow_runs, mlflow_server, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept_store(tmp_path_factory) -> Path:
    """A Hydra sweep over ZeRO-1 and ZeRO-2: two complete training runs in one MLflow store, steps 19-20 profiled
    (step 20 evaluates and checkpoints)."""
    root = tmp_path_factory.mktemp("sweep")
    train(root, "deepspeed=zero1,zero2", "trainer.profile_steps=[19,20]", multirun=True)
    return root


def test_sweep_trains_zero1_and_zero2_and_records_everything(swept_store, tmp_path):
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
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "loss_curve.png", "profile"}
        assert {a.path for a in client.list_artifacts(run.info.run_id, "profile")} == {
            "profile/steps_19-20.txt", "profile/trace_19-20.json"}
        profile = Path(client.download_artifacts(run.info.run_id, "profile", str(tmp_path / name)))
        tables = (profile / "steps_19-20.txt").read_text()
        assert "By host time:" in tables and "aten::mm" in tables and "By device time:" not in tables  # CPU workers
        phases = dict(line.split() for line in tables.split("ms per step):\n")[1].split("\n\n")[0].splitlines())
        assert set(phases) == {"batch", "forward", "backward", "optimizer", "metrics", "evaluate", "checkpoint"}, tables
        assert float(phases["backward"]) > float(phases["metrics"]) > 0, phases
        assert json.loads((profile / "trace_19-20.json").read_text())["traceEvents"]
        step_ms = history(client, run.info.run_id, "profile/step_ms")
        assert sorted(step_ms) == [20] and step_ms[20][0] > 0 and "profile/gpu_busy" not in run.data.metrics
        pauses = [m.value for m in client.get_metric_history(run.info.run_id, "train/checkpoint_pause_s")]
        assert len(pauses) == 3 and max(pauses) < 1.0, pauses  # the files are written in the background
        speed = history(client, run.info.run_id, "train/tokens_per_s")  # steps 11-15 and 21-25 hold a checkpoint
        after_checkpoint = min(speed[15][0], speed[25][0])
        assert after_checkpoint > 0.3 * statistics.median(speed[step][0] for step in (5, 10, 20, 30)), speed
        kept = checkpoints(swept_store, name)
        assert len(kept) == 2  # trainer.keep_checkpoints
        final = kept[-1]
        assert json.loads((final / "state.json").read_text())["step"] == 30
        assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert stages == {"1", "2"}


def test_compiled_model_trains_like_eager_with_compile_time_logged_apart(swept_store, tmp_path):
    """trainer.compile=true: the same losses as the sweep's eager ZeRO-2 run, the first step's and the
    first evaluation's compile times logged on their own, not in tokens/s."""
    output = train(tmp_path, "run_name=compiled", "trainer.compile=true")
    assert console_noise(output) == []  # Ray's, Ray Train's, DeepSpeed's and Inductor's output went to the log files
    client, runs = mlflow_runs(tmp_path)
    compiled = runs["compiled"].info.run_id
    eager_client, eager_runs = mlflow_runs(swept_store)
    (eager,) = [r.info.run_id for r in eager_runs.values() if r.data.params["deepspeed.zero_stage"] == "2"]
    for key in ("train/loss", "val/loss"):
        got, expected = history(client, compiled, key), history(eager_client, eager, key)
        assert sorted(got) == sorted(expected)
        for step in expected:
            assert got[step][0] == pytest.approx(expected[step][0], rel=1e-4), (key, step)
    assert set(history(client, compiled, "train/compile_s")) == {1} and set(history(client, compiled, "val/compile_s")) == {10}
    graphs = {step: values[0] for step, values in history(client, compiled, "train/compiled_graphs").items()}
    assert graphs[10] > 0 and {graphs[step] for step in graphs if step >= 10} == {graphs[10]}, graphs  # no recompile
    speed = [values[0] for values in history(client, compiled, "train/tokens_per_s").values()]
    assert min(speed) > 0.3 * statistics.median(speed), speed


def test_a_worker_process_killed_mid_run_resumes_and_ends_like_the_uninterrupted_run(swept_store, tmp_path):
    """SIGKILL to a Ray Train worker process (no Python exception, no goodbye) after the step-10
    checkpoint: the worker group restarts from the newest checkpoint and ends with the losses of the
    sweep's uninterrupted ZeRO-2 run; the re-run steps are not in the history twice, and only
    `keep_checkpoints` are on disk."""
    command = [sys.executable, str(REPO / "launch" / "train.py"), "experiment=smoke", f"cluster.root={tmp_path}",
               "run_name=sigkill", "trainer.log_every=1"]
    console = tmp_path / "ray" / "sigkill" / "console.log"
    with open(tmp_path / "driver.out", "w") as out:
        driver = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (console.exists() and "step 11/30" in console.read_text()):
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.out").read_text()[-3000:]
            time.sleep(0.05)
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True) if "RayTrainWorker" in p.name()
                   or "RayTrainWorker" in " ".join(p.cmdline())]
        assert workers
        workers[-1].kill()
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.out").read_text()[-3000:]
    finally:
        driver.kill()
    assert "resumed from the checkpoint at step" in console.read_text()
    client, runs = mlflow_runs(tmp_path)
    eager_client, eager_runs = mlflow_runs(swept_store)
    (uninterrupted,) = [r for r in eager_runs.values() if r.data.params["deepspeed.zero_stage"] == "2"]
    val = history(client, runs["sigkill"].info.run_id, "val/loss")  # train/loss: means over other intervals
    expected = history(eager_client, uninterrupted.info.run_id, "val/loss")
    assert sorted(val) == [10, 20, 30] and all(len(values) == 1 for values in val.values())
    for step in val:
        assert val[step][0] == pytest.approx(expected[step][0], rel=1e-6), step
    loss = history(client, runs["sigkill"].info.run_id, "train/loss")
    assert sorted(loss) == list(range(1, 31)) and all(len(values) == 1 for values in loss.values())
    assert [p.name for p in checkpoints(tmp_path, "sigkill")] == ["checkpoint_00000020", "checkpoint_00000030"]


def test_relaunch_resumes_the_run_and_its_mlflow_record_zero3(tmp_path):
    args = ("run_name=again", "deepspeed=zero3", "trainer.log_every=1", "trainer.inject_failure_at_step=23",
            "trainer.max_failures=0", "trainer.keep_checkpoints=1", "deepspeed.gradient_accumulation_steps=2")
    output = train(tmp_path, *args, ok=False)
    assert "injected failure" in output and "rank 0 failed: InjectedFailure" in output
    client, runs = mlflow_runs(tmp_path)
    assert runs["again"].info.status == "FAILED"
    assert (tmp_path / "ray" / "again" / "injected_failure_step_23").exists()
    before = history(client, runs["again"].info.run_id, "train/loss")
    assert sorted(before) == list(range(1, 23))

    output = train(tmp_path, *args, "verbose=true")  # the same command again: the drill does not fire twice
    assert "resumed from the checkpoint at step 20" in output
    assert "(RayTrainWorker pid=" in output  # verbose: the workers' own output too
    client, runs = mlflow_runs(tmp_path)
    assert list(runs) == ["again"] and runs["again"].info.status == "FINISHED"
    loss = history(client, runs["again"].info.run_id, "train/loss")
    assert sorted(loss) == list(range(1, 31)) and all(len(values) == 1 for values in loss.values())
    assert loss[21][0] == pytest.approx(before[21][0], rel=1e-6)  # the re-run takes the same step
    assert [p.name for p in checkpoints(tmp_path, "again")] == ["checkpoint_00000030"]


def console_noise(output: str) -> list[str]:
    """Console lines that are not sparta's (nor the tokenizer's progress bar)."""
    return [line for line in output.splitlines()
            if line.strip() and not line.startswith("[sparta] ") and not line.startswith("tokenizing ")]


def test_a_killed_driver_takes_its_local_ray_instance_with_it(tmp_path):
    """SIGKILL to the driver mid-training: the GCS, raylet, dashboard, agents and workers it started
    are all gone within seconds (no `ray stop` needed)."""
    command = [sys.executable, str(REPO / "launch" / "train.py"), "experiment=smoke", f"cluster.root={tmp_path}",
               "run_name=killed", "trainer.max_steps=100000", "trainer.log_every=1"]
    with open(tmp_path / "driver.out", "w") as out:
        driver = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while "[sparta] step " not in (tmp_path / "driver.out").read_text():
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.out").read_text()[-3000:]
            time.sleep(1)
        time.sleep(2)  # the watcher notes the workers every second
        started = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if "sparta.platform.reaper" not in " ".join(p.cmdline())]
        assert len(started) >= 5  # GCS, raylet, dashboard, agents, Ray Train controller and workers
        driver.kill()
        driver.wait()
        _, left = psutil.wait_procs(started, timeout=30)
        assert left == [], [" ".join(p.cmdline())[:120] for p in left]
    finally:
        driver.kill()


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
    with mlflow_server(f"sqlite:///{swept_store / 'mlflow.db'}", free_port()) as base:
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


def test_a_diverging_run_stops_before_a_checkpoint_keeps_its_lost_weights(tmp_path):
    """DeepSpeed checks no overflow (fp32 here; bf16 on GPUs): at lr 1e30 the weights leave the floats at
    step 2, and the loop stops at the first check (the step-5 checkpoint) instead of saving them. Ray Train
    does not restart it (trainer.max_failures=1): a restart would diverge again."""
    output = train(tmp_path, "run_name=diverge", "deepspeed.optimizer.lr=1e30", "trainer.max_failures=1",
                   "trainer.checkpoint_every=5", "trainer.log_every=10", ok=False)
    assert output.count("[sparta] stopped: step 5: train/grad_norm=") == 1
    assert "DivergedError: step 5: train/grad_norm=" in output
    assert "training diverged and the weights are no longer finite" in output
    assert checkpoints(tmp_path, "diverge") == []
    _, runs = mlflow_runs(tmp_path)
    assert runs["diverge"].info.status == "FAILED"

