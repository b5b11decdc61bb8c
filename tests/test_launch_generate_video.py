"""`launch/generate.py` on a video DiT run (the tiny checkpoint of tests/vdit_runs.py in a real MLflow SQLite
store, CPU, the reference backend): videos with dense attention and a plan, as GIF and MP4 in the run, their
timings and PSNR / SSIM; the PSNR and SSIM functions; bad input refused before sampling."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from vdit_runs import STEP, make_run, perturbed_model, tiny, write_checkpoint

from sparta.attention import Pattern, Plan, TileOrder, VideoGrid
from sparta.platform.checkpoint import STATE_FILE
from sparta.platform.dlm import use_attention
from sparta.platform.vdit import sample

REPO = Path(__file__).resolve().parents[1]


def generate_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "launch" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = generate_cli()


def plan_for(layers: dict[int, list[Pattern]], frames=2, height=4, width=8, tile=(1, 2, 8)) -> Plan:
    """A plan for the tiny model's token grid and order (other sizes: a plan for another model)."""
    grid = VideoGrid(frames, height, width)
    return Plan(grid, 16, layers, token_order=TileOrder(grid, tile))


def generate(uri, *args):
    return subprocess.run([sys.executable, "launch/generate.py", *args, "--tracking-uri", uri], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ---- PSNR and SSIM ------------------------------------------------------------------------------------


def test_psnr_and_ssim_of_two_flat_videos_by_hand():
    """Flat frames 0 and 0.5: MSE 0.25, PSNR = 10 log10(2^2 / 0.25) = 10 log10(16); no variance, so SSIM is
    the luminance term alone, (2 * 0 * 0.5 + C1) / (0 + 0.25 + C1) with C1 = (0.01 * 2)^2."""
    black, grey = torch.zeros(1, 3, 2, 16, 16), torch.full((1, 3, 2, 16, 16), 0.5)
    assert GENERATE.psnr(black, grey) == pytest.approx(10 * torch.log10(torch.tensor(16.0)).item())
    c1 = (0.01 * 2) ** 2
    assert GENERATE.ssim(black, grey) == pytest.approx(c1 / (0.25 + c1))


def test_psnr_and_ssim_identical_is_best_and_noise_lowers_both():
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 4, 24, 20, generator=generator) * 2 - 1
    assert GENERATE.psnr(video, video) == float("inf")
    assert GENERATE.ssim(video, video) == pytest.approx(1.0, abs=1e-12)
    scores = []
    for sigma in (0.01, 0.1, 0.5):
        noisy = (video + sigma * torch.randn(video.shape, generator=generator)).clamp(-1, 1)
        scores.append((GENERATE.psnr(video, noisy), GENERATE.ssim(video, noisy)))
        assert scores[-1] == pytest.approx((GENERATE.psnr(noisy, video), GENERATE.ssim(noisy, video)))  # symmetric
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(scores, scores[1:])), scores
    assert scores[0][1] < 1
    small = video[..., :8, :6]  # frames smaller than the 11-pixel window: the largest odd window that fits
    assert GENERATE.ssim(small, small) == pytest.approx(1.0) and GENERATE.ssim(small, torch.zeros_like(small)) < 0.1


# ---- the entry point ----------------------------------------------------------------------------------


def test_generate_samples_dense_and_plan_videos_and_logs_them_to_the_run(tmp_path):
    uri, client, run_id, checkpoint = make_run(tmp_path, "vdit-generate")
    tiles = Pattern.of("tiles", tile=(1, 2, 8), window=(1, 1, 1))
    plan_for({0: [tiles, Pattern.of("diagonal", width=16)], 1: [Pattern.of("full"), Pattern.of("skip")]}).save(
        tmp_path / "plan.yaml")
    client.log_artifact(run_id, str(tmp_path / "plan.yaml"), "search")  # as launch/search.py logs it

    result = generate(uri, "vdit-generate", "steps=3", "fps=4")
    assert result.returncode == 0, result.stderr
    assert "denoising (dense)" in result.stderr and "denoising (plan)" in result.stderr
    assert f"the search/plan.yaml artifact of run {run_id}" in result.stdout

    files = {f"generate/video-{kind}-{index}.{ext}" for kind in ("dense", "plan") for index in (0, 1)
             for ext in ("gif", "mp4")}
    assert {a.path for a in client.list_artifacts(run_id, "generate")} == files
    for name in files:
        local = client.download_artifacts(run_id, name, str(tmp_path / "download"))
        frames = iio.imread(local, index=None, **({"plugin": "FFMPEG"} if name.endswith(".mp4") else {}))
        assert frames.shape[:3] == (2, 16, 32), name  # tiny(): 2 frames of 16 x 32 pixels
        assert (checkpoint / name).is_file()  # out: <checkpoint>/generate

    metrics = client.get_run(run_id).data.metrics
    assert metrics["generate/video/dense/wall_s"] > 0 and metrics["generate/video/plan/wall_s"] > 0
    assert metrics["generate/video/plan/speedup"] > 0
    assert math.isfinite(metrics["generate/video/attention_share"])  # a tiny model on a shared CPU: any sign
    assert 0 < metrics["generate/video/plan/psnr"] < 200  # finite: skipped heads change the videos
    assert -1 <= metrics["generate/video/plan/ssim"] < 1
    assert client.get_metric_history(run_id, "generate/video/plan/psnr")[0].step == STEP


def test_a_plan_of_full_patterns_gives_the_dense_videos(tmp_path):
    uri, client, run_id, checkpoint = make_run(tmp_path, "vdit-full")
    plan_for({layer: [Pattern.of("full")] * 2 for layer in range(2)}).save(tmp_path / "full.yaml")
    result = generate(uri, run_id, f"plan={tmp_path / 'full.yaml'}", "labels=[3,7,11]", "steps=2", "cfg_scale=2.0",
                      f"out={tmp_path / 'videos'}")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "videos").glob("video-plan-*.mp4"))) == 3

    metrics = client.get_run(run_id).data.metrics
    assert metrics["generate/video/plan/psnr"] > 60  # inf (MLflow stores the largest float)
    assert metrics["generate/video/plan/ssim"] == pytest.approx(1.0, abs=1e-6)


def test_compiled_blocks_sample_the_eager_videos_with_every_attention_provider():
    """compile=true: dense, a plan, and the no-attention step of attention_share each compile (one
    recompile per layer and provider), and sample what the eager model samples (fp32, atol 1e-5)."""
    model = perturbed_model(tiny()).eval()
    plan = plan_for({layer: [Pattern.of("tiles", tile=(1, 2, 8), window=(1, 1, 1)), Pattern.of("diagonal", width=5)]
                     for layer in range(2)})
    noise, labels = torch.randn(2, 3, 2, 16, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    providers = [None, plan, lambda q, k, layer: []]

    def videos():
        out = []
        for provider in providers:
            use_attention(model, provider, "reference")
            out.append(sample(model, noise, labels, 2, cfg_scale=2.0))
        return out

    eager = videos()
    GENERATE.compile_blocks(model)
    for compiled, expected in zip(videos(), eager):
        torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eager[0], eager[1])  # the plan changes the videos


@pytest.mark.parametrize("args, message", [
    (["labels=[0,16]"], r"labels=\[0, 16\]: expected class ids in \[0, 16\) \(model.num_classes\)"),
    (["samples=3", "labels=[1,2]"], r"labels=\[1, 2\]: expected one class id per clip \(samples=3\)"),
    (["steps=0"], r"steps=0: expected >= 1"),
    (["formats=[avi]"], r"formats=\['avi'\]: expected a list of gif and mp4"),
    (["attention=plan"], r"attention=plan: no plan found; give plan=PATH or run launch/search.py"),
    (["attention=sparse"], r"attention='sparse': expected one of dense, plan, both"),
    (["prompt=hello"], r"prompt: Key 'prompt' not in 'VideoConfig'"),
    (["plan=GRID"], r"plan=.*grid.yaml: a plan for token grid VideoGrid\(frames=2, height=4, width=4.*this model has"),
    (["plan=TILE"], r"plan=.*tile.yaml: a plan for token order tile \(1, 2, 4\), this model has \(1, 2, 8\)"),
    (["plan=LAYERS"], r"plan=.*layers.yaml: a plan for layers \[0\], this model has \[0, 1\]"),
    (["plan=HEADS"], r"plan=.*heads.yaml: a plan for heads per layer \[3\], this model has \[2\]"),
    ([], r"plan \(.*checkpoint/search/plan.yaml\): a plan for heads per layer \[3\], this model has \[2\]"),
])
def test_bad_input_is_refused_before_sampling_naming_the_key(tmp_path, capsys, args, message):
    checkpoint = tmp_path / "checkpoint"
    write_checkpoint(checkpoint, tiny(), {})  # no MLflow run: plans come from plan= or the checkpoint
    full = Pattern.of("full")
    plans = {"GRID": plan_for({0: [full] * 2, 1: [full] * 2}, width=4, tile=(1, 2, 4)),
             "TILE": plan_for({0: [full] * 2, 1: [full] * 2}, tile=(1, 2, 4)),
             "LAYERS": plan_for({0: [full] * 2}), "HEADS": plan_for({0: [full] * 3, 1: [full] * 3})}
    for name, plan in plans.items():
        plan.save(tmp_path / f"{name.lower()}.yaml")
    args = [re.sub(r"^plan=([A-Z]+)$", lambda match: f"plan={tmp_path / match[1].lower()}.yaml", arg) for arg in args]
    if not args:  # the default: the plan launch/search.py wrote under the checkpoint
        (checkpoint / "search").mkdir()
        plans["HEADS"].save(checkpoint / "search" / "plan.yaml")
    with pytest.raises(SystemExit) as exit_:
        GENERATE.main([str(checkpoint), f"out={tmp_path / 'out'}", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("generate: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_run_fine_tuned_with_a_plan_samples_with_it_and_its_own_frame_rate(tmp_path, capsys):
    """No plan= and no search/plan.yaml: the plan the run trained with (model.plan); the videos at the run's
    data.fps, GIFs only with formats=[gif]. A model.plan missing on this machine is refused, naming the key."""
    checkpoint = tmp_path / "checkpoint"
    write_checkpoint(checkpoint, tiny(), {})
    plan_for({layer: [Pattern.of("full")] * 2 for layer in range(2)}).save(tmp_path / "trained-with.yaml")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    state["model_config"]["plan"], state["video_data"]["fps"] = str(tmp_path / "trained-with.yaml"), 5.0
    (checkpoint / STATE_FILE).write_text(json.dumps(state))

    GENERATE.main([str(checkpoint), "steps=2", "formats=[gif]", f"out={tmp_path / 'videos'}"])
    assert "model.plan=" in capsys.readouterr().out
    for kind in ("dense", "plan"):
        assert iio.immeta(tmp_path / "videos" / f"video-{kind}-0.gif")["duration"] == 200  # ms a frame: 5 fps
    assert not list((tmp_path / "videos").glob("*.mp4"))  # formats=[gif]

    (tmp_path / "trained-with.yaml").unlink()
    with pytest.raises(SystemExit) as exit_:
        GENERATE.main([str(checkpoint), "steps=2", f"out={tmp_path / 'more'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("generate: model.plan=") and "not on this machine" in err, err
    assert not (tmp_path / "more").exists()
