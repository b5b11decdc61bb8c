"""The console: the driver prints the lines the workers append to the run's console file, the progress
line's ETA, and the metric means behind the line."""

import time

import torch

from sparta.platform import worker
from sparta.platform.console import CONSOLE_FILE, ConsoleTail


def test_tail_prints_only_new_complete_lines(tmp_path, capsys):
    (tmp_path / CONSOLE_FILE).write_text("[sparta] a line of an earlier launch\n")
    with ConsoleTail(tmp_path, poll_s=0.01):
        with open(tmp_path / CONSOLE_FILE, "a") as f:
            f.write("[sparta] step 1/2\n[sparta] step 2")  # the second line is still being written
            f.flush()
            time.sleep(0.1)
            assert capsys.readouterr().out == "[sparta] step 1/2\n"
            f.write("/2\n")
    assert capsys.readouterr().out == "[sparta] step 2/2\n"


def console_lines(monkeypatch, *clock: float) -> list[str]:
    """The lines `Progress` writes from here on, `time.perf_counter` reading `clock` in turn."""
    readings = iter(clock)
    monkeypatch.setattr(worker.time, "perf_counter", lambda: next(readings))
    lines = []
    monkeypatch.setattr(worker.log, "info", lines.append)
    return lines


def test_eta_of_a_short_run_is_not_zero_seconds(monkeypatch):
    """5 of 30 steps in 0.5 s: 2.5 s to go, shown as such (it used to read "2s", then "0s")."""
    lines = console_lines(monkeypatch, 100.0, 100.5)
    progress = worker.Progress(max_steps=30, first_step=0)
    metrics = {"train/tokens_per_s": progress.tokens_per_s(5, tokens_per_step=512)}
    progress.show(5, metrics)
    assert lines[-1].endswith("5.1k tok/s | eta 2.5s")


def test_the_line_shows_mfu_and_peak_gpu_memory_when_logged(monkeypatch):
    lines = console_lines(monkeypatch, 0.0, 2.0)
    progress = worker.Progress(max_steps=20, first_step=0)
    metrics = {"train/tokens_per_s": progress.tokens_per_s(10, tokens_per_step=1000),
               "train/mfu": 0.3584, "gpu/peak_reserved_gib": 41.27}
    progress.show(10, metrics)
    assert lines[-1].endswith("5.0k tok/s | mfu 35.8% | mem 41.3 GiB | eta 2.0s")


def test_the_step_that_compiled_is_left_out_of_the_first_window(monkeypatch):
    """Step 1 compiles for 60 s, steps 2-10 take 1 s each: 9 steps' tokens in 9 s (counting step 1's
    tokens, as it once did, read 10/9 too fast); the ETA of the 10 steps left uses the same rate."""
    lines = console_lines(monkeypatch, 0.0, 70.0)
    progress = worker.Progress(max_steps=20, first_step=0)
    progress.discount(61.0, steps=1)  # all of step 1, as the worker measures it
    metrics = {"train/tokens_per_s": progress.tokens_per_s(10, tokens_per_step=900)}
    assert metrics["train/tokens_per_s"] == 900
    progress.show(10, metrics)
    assert lines[-1].endswith("0.9k tok/s | eta 10s")


def test_summary_names_the_mlflow_run_and_what_did_not_reach_it(capsys):
    """A store lost mid-run: the run id is still printed (params and early steps are there), with what
    was not recorded and that the run could not be closed; nothing of it when all went through."""
    from pathlib import Path

    from sparta.platform.job import JobResult, print_summary, tracking_gaps

    result = JobResult("r", 30, 6.5, Path("/runs/ray/r/checkpoint_00000030"), "http://mlflow:5000", "abc123")
    print_summary(result, "sparta", tracking_gaps({"mlflow/unsent_batches": 3, "mlflow/recorded_through": 20}, False))
    out = capsys.readouterr().out
    assert "MLflow run abc123 in experiment 'sparta' at http://mlflow:5000" in out
    assert "3 metric batches were not recorded" in out and "recorded through step 20" in out
    assert "could not be marked finished" in out and "tracking was off" not in out
    print_summary(result, "sparta", tracking_gaps({"mlflow/unsent_batches": 0}, True))
    assert "MLflow:" not in capsys.readouterr().out


def test_metric_sums_give_the_weighted_mean_per_step_of_scalars_and_stacks():
    """Two optimizer steps of two micro-batches each (weight 1/2); a key first seen in the second step is
    averaged over all the steps, as the interval's sum; a stack keeps its shape (two layers' expert
    loads, [2, 2]); the model's tensors are never written."""
    sums = worker.MetricSums()
    loss = [torch.tensor(v) for v in (1.0, 3.0, 5.0, 7.0)]
    load = [torch.tensor([[v, 1.0 - v], [0.0, 1.0]]) for v in (0.2, 0.4, 0.6, 0.8)]
    for micro in range(4):
        metrics = {"loss": loss[micro], "moe/layers/expert_load": load[micro]}
        if micro >= 2:
            metrics["moe/tls"] = torch.tensor(0.9, dtype=torch.bfloat16)
        sums.add(metrics, 0.5)
    means = sums.mean(all_ranks=False)
    assert means["loss"] == 4.0 and isinstance(means["loss"], float)
    torch.testing.assert_close(means["moe/layers/expert_load"], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert abs(means["moe/tls"] - 0.9 / 2) < 1e-3  # bf16 0.9, over both steps
    assert loss[0].item() == 1.0 and torch.equal(load[0], torch.tensor([[0.2, 0.8], [0.0, 1.0]]))
    assert sums.sums == {} and sums.steps == 0.0  # reset for the next interval
