"""The Sparse-vDiT workflow at the benchmark grid (13 x 30 x 52 tokens, heads of dim 128) on one GPU, shortened:
`benchmarks/vdit.py` trains the dense video DiT through launch/train.py (bf16), searches a plan, times the
plan's attention on the model's q/k/v against cuDNN and FlexAttention, samples dense and sparse, and
fine-tunes with the plan (the Triton kernels' backward inside DeepSpeed)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
REPO = Path(__file__).resolve().parents[2]


def test_the_workflow_trains_searches_times_samples_and_fine_tunes_at_the_benchmark_grid(tmp_path):
    results, videos = tmp_path / "results", tmp_path / "videos"
    command = [sys.executable, "benchmarks/vdit.py", "--root", str(tmp_path / "root"), "--results", str(results),
               "--videos", str(videos), "--train-steps", "16", "--finetune-steps", "8", "--sample-steps", "3",
               "--calibration-clips", "1", "--max-error", "0.1"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]  # keep_going prints a failed stage's traceback

    patterns = [json.loads(line) for line in next(results.glob("patterns-*.jsonl")).read_text().splitlines()]
    assert {r["impl"] for r in patterns} == {"cudnn", "sparta", "flex"}
    assert all(r["case"] == "vdit-plan-13x30x52" and r["shape"]["tokens"] == 20280 and r["ms"] > 0 for r in patterns)
    sparta = next(r for r in patterns if r["impl"] == "sparta")
    assert sparta["rel_err"] < 0.5 and len(sparta["speedup_per_layer"]) == 8

    [quality] = [json.loads(line) for line in next(results.glob("quality-*.jsonl")).read_text().splitlines()]
    assert quality["case"] == "vdit-plan-13x30x52"
    assert math.isfinite(quality["dense"]["val_loss"]) and math.isfinite(quality["finetune"]["val_loss"])
    assert quality["search"]["calibration_error"] <= 0.1
    for key in ("sample", "sample_finetuned"):
        assert quality[key]["plan/speedup"] > 0 and quality[key]["plan/psnr"] > 0, quality[key]
    assert len(list(videos.glob("vdit-dense-video-*.gif"))) == 4  # 2 samples, dense and plan
