"""What every benchmark shares: the fields each record carries (DESIGN.md: device, commit, date), where
records go, and running sections so that one failure does not cost the rest of a device call."""

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """$SPARTA_COMMIT when the caller sets it (the device tool copies the working tree, and the git data
    that comes with it may name another commit), else the checked-out commit (`-dirty` when the tree
    has changes)."""
    if "SPARTA_COMMIT" in os.environ:
        return os.environ["SPARTA_COMMIT"]
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return f"{head}-dirty" if dirty else head
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "uncommitted"


def device_name() -> str:
    """The GPU's name, else the CPU's model and core count (CPU-worker benchmarks)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    return f"{models[0] if models else 'CPU'} ({os.cpu_count()} cores)"


def metadata(bench: str) -> dict:
    return {"bench": bench, "device": device_name(), "commit": commit(), "date": datetime.date.today().isoformat()}


def results_path(bench: str) -> Path:
    """benchmarks/results/<bench>-<device slug>.jsonl"""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    return RESULTS / f"{bench}-{slug}.jsonl"


HISTORIES = ("train/tokens_per_s", "train/mfu", "train/compiled_graphs")


def train(root: Path, name: str, *overrides: str) -> dict:
    """One `launch/train.py` job (cluster.root `root`, run_name `name`); returns its MLflow run's
    params, final metrics, the histories of HISTORIES ({key: {step: value}}) and its wall time."""
    from mlflow.tracking import MlflowClient

    command = [sys.executable, str(REPO / "launch" / "train.py"), f"cluster.root={root}", f"run_name={name}", *overrides]
    print("+", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sparta")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`sparta.run_name` = '{name}'")
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in HISTORIES}
    return {"params": run.data.params, "metrics": run.data.metrics, "history": history,
            "wall_s": time.perf_counter() - start, "run_id": run.info.run_id}


def steady(by_step: dict[int, float]) -> float:
    """Median over the second half of a run's logged values: compilation, warm-up and the first
    evaluations left out."""
    values = [by_step[step] for step in sorted(by_step)]
    return statistics.median(values[len(values) // 2:])


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_going(section, *args, **kwargs):
    """Run one section; a failure is printed and the next section still runs (device time is scarce)."""
    try:
        return section(*args, **kwargs)
    except Exception:  # noqa: BLE001 - report and continue
        traceback.print_exc()
        torch.cuda.empty_cache()
        return None
