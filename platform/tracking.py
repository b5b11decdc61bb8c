"""MLflow tracking that never stops training.

The driver opens (or, for a resumed run name, reopens) the MLflow run and logs the config, system
info and final artifacts; rank 0 logs per-step metrics into the same run by id. Every call goes
through `Tracker._call`: the first failure (store unreachable, disk full, ...) is reported once and
tracking is switched off, training goes on.
"""

import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

RUN_NAME_TAG = "sparta.run_name"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

# MLflow's HTTP client retries for minutes by default; an unreachable server must not stall a step.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_tracking_uri(configured: str | None, root: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


class Tracker:
    def __init__(self, uri: str, run_id: str | None = None):
        self.uri, self.run_id = uri, run_id
        self.enabled = True
        self._client = None

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
            return fn(self._client, *args, **kwargs)
        except Exception as error:  # any failure of the store: say so once, keep training
            self.enabled = False
            print(f"[sparta] MLflow tracking at {self.uri} failed while trying to {what} "
                  f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                  "training continues without tracking", file=sys.stderr, flush=True)
            return None

    def open_run(self, experiment: str, run_name: str, artifact_root: Path) -> bool:
        """Create the run, or reopen the one a previous launch of `run_name` made; True if resumed."""

        def open_(client):
            found = client.get_experiment_by_name(experiment)
            # The experiment-kind tag makes MLflow's UI open the runs table (model training), not its GenAI view.
            experiment_id = (found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifact_root.as_uri(), tags={EXPERIMENT_KIND_TAG: "custom_model_development"}))
            previous = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
            if previous:
                self.run_id = previous[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
                return True
            self.run_id = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}).info.run_id
            return False

        return bool(self._call("open a run", open_))

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
            self._call("log params", lambda c, chunk: c.log_batch(self.run_id, params=chunk), batch[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", lambda c: c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log metrics", lambda c: c.log_batch(self.run_id, metrics=batch))

    def log_text(self, text: str, name: str) -> None:
        self._call(f"log {name}", lambda c: c.log_text(self.run_id, text, name))

    def log_loss_curve(self) -> None:
        """Plot the run's whole train/val loss history (all launches of it) as loss_curve.png."""

        def history(client):
            series = {}
            for key in ("train/loss", "val/loss"):
                points = sorted(client.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))
                if points:
                    series[key] = ([m.step for m in points], [m.value for m in points])
            return series

        series = self._call("read the loss history", history)
        if series is not None:
            from sparta.platform import plots

            self.log_figure(plots.loss_curve(series), "loss_curve.png")

    def log_figure(self, figure, name: str) -> None:
        """A `sparta.platform.plots` figure as a PNG artifact of the run."""

        def log(client):
            from sparta.platform.plots import save

            with tempfile.TemporaryDirectory() as tmp:
                client.log_artifact(self.run_id, str(save(figure, Path(tmp) / name)))

        self._call(f"log {name}", log)

    def log_moe_plots(self, expert_loads, cls_by_layer: dict[str, list[float]]) -> None:
        """expert_load.png: each MoE layer's expert load over training (an `ExpertLoadHistory`);
        cls_by_chunk_size.png: each layer's final chunk-level sparsity against the chunk size."""
        if not expert_loads.steps:
            return
        import numpy as np

        from sparta.moe import CLS_CHUNK_SIZES
        from sparta.platform import plots

        layers = sorted(expert_loads.loads)
        load = np.stack([np.asarray(expert_loads.loads[layer]) for layer in layers], axis=1)  # [steps, L, E]
        self.log_figure(plots.expert_load_heatmap(np.asarray(expert_loads.steps), load, layers), "expert_load.png")
        if cls_by_layer:
            names = sorted(cls_by_layer)
            cls = np.asarray([cls_by_layer[name] for name in names])
            self.log_figure(plots.cls_by_chunk_size(np.asarray(CLS_CHUNK_SIZES), cls, names), "cls_by_chunk_size.png")

    def end_run(self, status: str) -> None:
        self._call("end the run", lambda c: c.set_terminated(self.run_id, status=status))


def system_info() -> dict:
    import deepspeed
    import ray
    import torch

    info = {
        "system.host": socket.gethostname(),
        "system.platform": platform.platform(),
        "system.python": platform.python_version(),
        "system.cpus": os.cpu_count(),
        "system.torch": torch.__version__,
        "system.deepspeed": deepspeed.__version__,
        "system.ray": ray.__version__,
    }
    if torch.cuda.is_available():
        info["system.gpus"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info
