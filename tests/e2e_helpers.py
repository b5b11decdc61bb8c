"""Helpers of the end-to-end tests: run `launch/train.py` and read what it left in MLflow and on disk."""

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
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


@contextlib.contextmanager
def mlflow_server(backend_uri: str, port: int):
    """A real `mlflow server` on the store, answering /health; stopped on exit. Yields its URL."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
                time.sleep(0.5)
        yield base
    finally:
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
        server.wait(timeout=30)
