"""The video DiT through `launch/train.py` (real Ray, DeepSpeed, MLflow, 2 CPU workers) on the procedural
video source: the flow-matching validation loss drops, tokens/s counts a clip's patches, and a
checkpoint holds the family's config."""

import json

import pytest
from e2e_helpers import checkpoints, history, mlflow_runs, train

pytestmark = pytest.mark.slow


def test_video_dit_trains_on_procedural_video(tmp_path):
    output = train(tmp_path, "run_name=vdit", "trainer.activation_checkpointing=true", experiment="vdit_smoke")
    assert "(ppl" not in output  # a flow-matching loss is not a cross-entropy
    client, runs = mlflow_runs(tmp_path)
    run = runs["vdit"]
    assert run.data.params["model.family"] == "vdit" and run.data.params["data.tokens_per_clip"] == "256"
    val = history(client, run.info.run_id, "val/loss")
    assert sorted(val) == [10, 20, 30]
    assert val[30][0] < 0.95 * val[10][0], val  # the same validation draws at every evaluation
    assert all(v[0] > 0 for v in history(client, run.info.run_id, "train/tokens_per_s").values())
    (last,) = checkpoints(tmp_path, "vdit")[-1:]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 30 and state["model_config"]["family"] == "vdit" and state["seq_len"] == 256
