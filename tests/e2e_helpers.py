"""Helpers of the end-to-end tests: run `launch/train.py` and read what it left in MLflow and on disk."""

import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def train(root: Path, *overrides: str, ok: bool = True, multirun: bool = False, experiment: str = "smoke") -> str:
    command = [sys.executable, str(REPO / "launch" / "train.py"), *(["-m"] if multirun else []),
               f"experiment={experiment}", f"cluster.root={root}", *overrides]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    if (proc.returncode == 0) != ok:
        pytest.fail(f"{' '.join(command[1:])} exited {proc.returncode}:\n{output[-6000:]}")
    return output


def mlflow_runs(root: Path) -> tuple[MlflowClient, dict]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sparta")
    return client, {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, list[float]]:
    by_step = defaultdict(list)
    for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        by_step[metric.step].append(metric.value)
    return dict(by_step)


def checkpoints(root: Path, run_name: str) -> list[Path]:
    return sorted(p for p in (root / "ray" / run_name).glob("checkpoint_*") if p.is_dir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
