"""Finding a trained model again: by MLflow run id, sparta run name, checkpoint directory or export.

The entry points that read a run (`launch/export.py`, `launch/eval.py`, `launch/compare.py`) go through
here. A checkpoint (`sparta.platform.checkpoint`) carries everything needed to rebuild its model:
`state.json` holds the model config, the prepared corpus and the MLflow run it belongs to. An export
is the same `model.safetensors` with a `config.json` beside it.
"""

import argparse
import json
import sys
from pathlib import Path

from torch import nn

from sparta.platform import checkpoint
from sparta.platform.checkpoint import MODEL_FILE, STATE_FILE, load_model_file
from sparta.platform.models import build_model, config_from_dict
from sparta.platform.tracking import RUN_NAME_TAG, default_tracking_uri

EXPORT_CONFIG = "config.json"
CHECKPOINT_DIR_TAG = "sparta.checkpoint_dir"


def find_run(client, reference: str):
    """An MLflow run by id, or by the sparta run name (the newest run with that name); None if neither."""
    try:
        return client.get_run(reference)
    except Exception:  # not an id of this store
        pass
    for experiment in client.search_experiments():
        found = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{reference}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    return None


def resolve(reference: str, tracking_uri: str) -> tuple[Path, str | None]:
    """`reference` -> (a model directory: checkpoint or export, its MLflow run id if known).

    Accepts a checkpoint or export directory, a run's Ray storage directory, an MLflow run id or a
    sparta run name. Fails naming what was looked for."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path.resolve(), _run_id_of(path)
        latest = checkpoint.latest(path)
        if latest is None:
            raise FileNotFoundError(f"{reference}: a directory with neither {MODEL_FILE} nor complete checkpoint_* folders")
        return latest.resolve(), _run_id_of(latest)
    from mlflow.tracking import MlflowClient

    run = find_run(MlflowClient(tracking_uri), reference)
    if run is None:
        raise FileNotFoundError(f"{reference}: not a directory, nor an MLflow run id or sparta run name in {tracking_uri}")
    run_dir = run.data.tags.get(CHECKPOINT_DIR_TAG)
    latest = checkpoint.latest(Path(run_dir)) if run_dir else None
    if latest is None:
        raise FileNotFoundError(f"{reference}: MLflow run {run.info.run_id} has no complete checkpoint under {run_dir}")
    return latest.resolve(), run.info.run_id


def cli(description: str, run_help: str) -> argparse.ArgumentParser:
    """The arguments every entry point that reads a run takes: the run, and the MLflow store."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help=run_help)
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    return parser


def resolve_cli(args: argparse.Namespace, tool: str) -> tuple[Path, str | None, str]:
    """`resolve` for an entry point: (model dir, run id, tracking URI), or exit naming what was not found."""
    uri = default_tracking_uri(args.tracking_uri, Path("runs").resolve())
    try:
        return (*resolve(args.run, uri), uri)
    except FileNotFoundError as error:
        print(f"{tool}: {error}", file=sys.stderr)
        sys.exit(2)


def read_config(model_dir: Path) -> dict:
    """A checkpoint's `state.json` or an export's `config.json`: model config, corpus, run."""
    model_dir = Path(model_dir)
    for name in (STATE_FILE, EXPORT_CONFIG):
        if (model_dir / name).is_file():
            return json.loads((model_dir / name).read_text())
    raise FileNotFoundError(f"{model_dir}: neither {STATE_FILE} (checkpoint) nor {EXPORT_CONFIG} (export)")


def load_model(model_dir: Path) -> tuple[nn.Module, dict]:
    """The whole model of its family (`model_config.family`; all experts on this process, fp32, CPU)
    and its config dict."""
    config = read_config(model_dir)
    model = build_model(config_from_dict(config["model_config"]))
    load_model_file(model, model_dir)
    return model, config


def _run_id_of(model_dir: Path) -> str | None:
    return read_config(model_dir).get("mlflow_run_id")
