"""A tiny video DiT checkpoint laid out as the trainer writes it, in a real MLflow SQLite run: the set-up
of the tests of the entry points that read a vdit run (launch/search.py, launch/generate.py)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from sparta.platform.checkpoint import MODEL_FILE, STATE_FILE, checkpoint_dir
from sparta.platform.runs import CHECKPOINT_DIR_TAG
from sparta.platform.tracking import RUN_NAME_TAG
from sparta.platform.vdit import VDiTConfig, VideoDiT
from sparta.platform.video_data import VideoDataConfig

STEP = 5


def tiny() -> VDiTConfig:
    """Token grid 2 x 4 x 8 = 64 tokens in tiles of 1 x 2 x 8 = 16 tokens (one kernel block each)."""
    return VDiTConfig(frames=2, height=16, width=32, patch=(1, 4, 4), tile=(1, 2, 8), d_model=32, n_layers=2,
                      n_heads=2, attention_backend="reference")


def perturbed_model(cfg: VDiTConfig) -> VideoDiT:
    """Random weights (seed 0), perturbed so that attention matters (AdaLN-zero starts every block as the
    identity)."""
    torch.manual_seed(0)
    model = VideoDiT(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def write_checkpoint(directory: Path, cfg: VDiTConfig, state: dict) -> None:
    """`perturbed_model(cfg)` and the state.json of step STEP (clips of the data defaults at the model's size)."""
    model = perturbed_model(cfg)
    directory.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(directory / MODEL_FILE))
    video = VideoDataConfig(frames=cfg.frames, height=cfg.height, width=cfg.width, channels=cfg.in_channels)
    (directory / STATE_FILE).write_text(json.dumps({"step": STEP, "model_config": asdict(cfg),
                                                    "video_data": asdict(video), **state}))


def make_run(root: Path, name: str) -> tuple[str, MlflowClient, str, Path]:
    """(tracking URI, client, run id, checkpoint dir): an MLflow store under `root` with a run `name` whose
    Ray storage directory holds one checkpoint of the tiny model."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sparta", artifact_location=(root / "mlartifacts").as_uri())
    run_dir = root / "ray" / name
    run_id = client.create_run(experiment, run_name=name, tags={RUN_NAME_TAG: name,
                                                                CHECKPOINT_DIR_TAG: str(run_dir)}).info.run_id
    write_checkpoint(checkpoint_dir(run_dir, STEP), tiny(), {"mlflow_run_id": run_id, "tracking_uri": uri})
    return uri, client, run_id, checkpoint_dir(run_dir, STEP)
