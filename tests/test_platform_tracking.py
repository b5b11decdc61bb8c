"""MLflow tracking: a real SQLite store, and a store that cannot be reached."""

import time

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
