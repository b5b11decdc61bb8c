"""What every benchmark shares: the fields each record carries (DESIGN.md: device, commit, date), where
records go, and running sections so that one failure does not cost the rest of a device call."""

import datetime
import json
import os
import re
import subprocess
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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


def metadata(bench: str) -> dict:
    return {"bench": bench, "device": torch.cuda.get_device_name(), "commit": commit(),
            "date": datetime.date.today().isoformat()}


def results_path(bench: str) -> Path:
    """benchmarks/results/<bench>-<device slug>.jsonl"""
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return RESULTS / f"{bench}-{slug}.jsonl"


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
