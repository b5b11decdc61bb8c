"""`trainer.profile_steps=[FIRST,LAST]`: where the optimizer steps of a real training run go.

Rank 0 runs torch's profiler over steps FIRST..LAST (CPU ops, and CUDA kernels on a GPU), the whole
loop body: data, forward, backward, DeepSpeed's step, metrics, logging, and the evaluation and
checkpoint of a step that has them. The run gets `profile/steps_FIRST-LAST.txt` (the top ops by
device time and by host time), the Chrome trace `profile/trace_FIRST-LAST.json` (chrome://tracing or
ui.perfetto.dev) and the metrics `profile/step_ms` and, on a GPU, `profile/gpu_busy`: the share of
the wall time in which a kernel ran. Below 1, the host paces the steps (Python, launches,
synchronisations), not the GPU. The loop names its phases (`sparta/forward`, `sparta/backward`,
`sparta/optimizer`, ...) and the table lists the host time each one takes.
"""
import time
from pathlib import Path

import torch

ROWS = 40  # ops per table
PHASE_PREFIX = "sparta/"  # `torch.profiler.record_function` names of the training loop's phases


class StepProfiler:
    def __init__(self, steps: tuple[int, int], use_gpu: bool, out_dir: Path):
        self.first, self.last = steps
        self.use_gpu, self.out_dir = use_gpu, Path(out_dir)
        self._profile, self._start = None, 0.0

    def step_begins(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.use_gpu:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._profile = torch.profiler.profile(activities=activities)
        self._profile.__enter__()
        self._start = time.perf_counter()

    def step_ends(self, step: int) -> tuple[dict[str, float], list[Path]] | None:
        """After the last profiled step: (metrics, files written under out_dir); else None."""
        if step != self.last:
            return None
        if self.use_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._start
        self._profile.__exit__(None, None, None)
        steps = self.last - self.first + 1
        events = self._profile.key_averages()
        metrics = {"profile/step_ms": 1e3 * wall / steps}
        name = f"{self.first}-{self.last}"
        tables = [f"steps {name}: {metrics['profile/step_ms']:.1f} ms/step (wall, profiler on)"]
        if self.use_gpu:
            # kernels only: the loop's phases and Inductor's graph calls also appear as GPU ranges (annotations)
            kernel_us = sum(e.self_device_time_total for e in events
                            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
            metrics["profile/gpu_busy"] = kernel_us / 1e6 / wall
            tables[0] += f", GPU busy {metrics['profile/gpu_busy']:.0%} of it"
            tables += ["", "By device time:", events.table(sort_by="self_device_time_total", row_limit=ROWS,
                                                           max_name_column_width=80)]
        phases = [e for e in events if e.key.startswith(PHASE_PREFIX) and e.device_type == torch.autograd.DeviceType.CPU]
        if phases:
            tables += ["", "The loop's phases (host time from start to end, ms per step):"]
            tables += [f"  {e.key.removeprefix(PHASE_PREFIX):<12} {e.cpu_time_total / 1e3 / steps:8.2f}"
                       for e in sorted(phases, key=lambda e: -e.cpu_time_total)]
        tables += ["", "By host time:", events.table(sort_by="self_cpu_time_total", row_limit=ROWS,
                                                      max_name_column_width=80)]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files = [self.out_dir / f"steps_{name}.txt", self.out_dir / f"trace_{name}.json"]
        files[0].write_text("\n".join(tables) + "\n")
        self._profile.export_chrome_trace(str(files[1]))
        self._profile = None
        return metrics, files
