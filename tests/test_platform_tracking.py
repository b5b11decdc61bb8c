"""MLflow tracking: a real SQLite store, and a store that cannot be reached."""

import time

from e2e_helpers import free_port, mlflow_server
from mlflow.tracking import MlflowClient

from sparta.platform.tracking import RUN_NAME_TAG, Tracker


def test_open_log_and_reopen_by_run_name(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    assert tracker.open_run("exp", "run-a", tmp_path / "artifacts") is False
    tracker.log_params({"trainer.max_steps": 10, "deepspeed.zero_stage": 2})
    tracker.log_metrics({"train/loss": 2.5}, step=1)
    tracker.log_metrics({"train/loss": 2.0, "val/loss": 2.2}, step=2)
    tracker.log_text("a: 1\n", "config.yaml")
    tracker.log_loss_curve()
    tracker.end_run("FINISHED")

    again = Tracker(uri)
    assert again.open_run("exp", "run-a", tmp_path / "artifacts") is True
    assert again.run_id == tracker.run_id
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[RUN_NAME_TAG] == "run-a"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train/loss")] == [2.5, 2.0]
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id)) == ["config.yaml", "loss_curve.png"]
    assert Tracker(uri).open_run("exp", "run-b", tmp_path / "artifacts") is False


def test_unreachable_server_is_reported_once_and_then_skipped(tmp_path, capsys):
    tracker = Tracker("http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    assert tracker.open_run("exp", "run", tmp_path) is False
    for step in range(50):
        tracker.log_metrics({"train/loss": 1.0}, step)
    tracker.end_run("FINISHED")
    assert time.perf_counter() - start < 30
    assert not tracker.enabled
    err = capsys.readouterr().err
    assert err.count("training continues without tracking") == 1 and "http://127.0.0.1:9" in err


def test_rewind_keeps_one_point_per_step_the_rerun_s(tmp_path):
    """A run resumed from its step-4 checkpoint re-runs steps 5..: the points logged after step 4 before
    the restart are gone, the re-run's take their place, and the runs table shows the newest value."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri)
    first.open_run("exp", "run", tmp_path / "artifacts")
    for step in range(1, 8):
        first.log_metrics({"train/loss": 10.0 - step, **({"val/loss": 20.0 - step} if step % 3 == 0 else {})}, step)

    resumed = Tracker(uri, first.run_id)
    resumed.rewind(4)
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).data.metrics == {"train/loss": 6.0, "val/loss": 17.0}  # steps 4 and 3
    for step in range(5, 7):
        resumed.log_metrics({"train/loss": 100.0 + step, **({"val/loss": 200.0} if step % 3 == 0 else {})}, step)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss"))
    assert loss == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 105.0), (6, 106.0)]
    val = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "val/loss"))
    assert val == [(3, 17.0), (6, 200.0)]
    assert client.get_run(first.run_id).data.metrics == {"train/loss": 106.0, "val/loss": 200.0}


def test_server_lost_mid_run_is_said_once_and_the_kept_metrics_arrive_when_it_is_back(tmp_path, capsys):
    """A real `mlflow server` stops after step 3 and comes back (same store) after step 6: the loss is
    said once, the return once, every step is in the history in order, and the run can be closed."""
    backend, port = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    with mlflow_server(backend, port) as url:
        tracker = Tracker(url, retry_s=0.2)
        tracker.open_run("exp", "run", tmp_path / "artifacts")
        for step in range(1, 4):
            tracker.log_metrics({"train/loss": float(step)}, step)
    for step in range(4, 7):
        time.sleep(0.3)  # past the retry interval: every step tries the store again
        tracker.log_metrics({"train/loss": float(step)}, step)
    assert not tracker.enabled and tracker.unsent_batches == 3 and tracker.recorded_through == 3
    with mlflow_server(backend, port):
        time.sleep(0.3)
        tracker.log_metrics({"train/loss": 7.0}, 7)
        assert tracker.enabled and tracker.recorded_through == 7
        assert tracker.end_run("FINISHED")
    client = MlflowClient(backend)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train/loss")] == \
        [(step, float(step)) for step in range(1, 8)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    err = capsys.readouterr().err
    assert err.count("failed while trying to log metrics") == 1 and err.count("answers again after") == 1, err
