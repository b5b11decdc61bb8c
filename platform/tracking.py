"""MLflow tracking that never stops training.

The driver opens (or, for a resumed run name, reopens) the MLflow run and logs the config, system
info and final artifacts; rank 0 logs per-step metrics into the same run by id. Every call goes
through `Tracker._call`. A store that cannot be reached before a run exists switches tracking off for
the job. Once the run exists, a failure (server down, network, disk full) is said once; metrics are
then kept in memory and the store is tried again every `retry_s`: when it answers, the kept metrics
are sent in order and that is said once too. Training never waits for the store.
"""

import collections
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

RUN_NAME_TAG = "sparta.run_name"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MAX_KEPT_BATCHES = 2000  # metric batches kept while the store is down (the oldest go first beyond)

# MLflow's HTTP client retries for minutes by default; an unreachable server must not stall a step.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_tracking_uri(configured: str | None, root: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


class StoreDown(Exception):
    """A tracking call was not made: the store failed and is not due for another try yet."""


class Tracker:
    """`enabled`: tracking is on and everything logged so far has reached the store."""

    def __init__(self, uri: str, run_id: str | None = None, retry_s: float = 30.0):
        self.uri, self.run_id, self.retry_s = uri, run_id, retry_s
        self.switched_off = False
        self.down_since: float | None = None  # when the store last stopped answering
        self._next_try = 0.0  # while down: no call before this time (time.monotonic)
        self.recorded_through = 0  # the last step whose metrics reached the store
        self.lost_batches = 0  # metric batches dropped beyond MAX_KEPT_BATCHES
        self._kept = collections.deque()  # (step, metrics) not yet in the store
        self._client = None
        self._logged_through = float("-inf")  # steps at or before this one are already in the store (`rewind`)

    @property
    def enabled(self) -> bool:
        return not self.switched_off and self.down_since is None and not self._kept

    @property
    def unsent_batches(self) -> int:
        return len(self._kept) + self.lost_batches

    def _call(self, what: str, fn, *args, **kwargs):
        """fn(client, ...)'s result; raises StoreDown if the store failed now or recently."""
        if self.switched_off or (self.down_since is not None and time.monotonic() < self._next_try):
            raise StoreDown(what)
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
            result = fn(self._client, *args, **kwargs)
        except Exception as error:  # any failure of the store: say so once, keep training
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if self.run_id is None:
                self.switched_off = True
                print(f"[sparta] MLflow tracking at {self.uri} failed while trying to {what} ({reason}); "
                      "training continues without tracking", file=sys.stderr, flush=True)
            elif self.down_since is None:
                self.down_since = time.monotonic()
                print(f"[sparta] MLflow tracking at {self.uri} failed while trying to {what} ({reason}); "
                      f"training goes on, metrics are kept and sent when the store answers again "
                      f"(tried every {self.retry_s:g} s)", file=sys.stderr, flush=True)
            self._next_try = time.monotonic() + self.retry_s
            raise StoreDown(what) from error
        if self.down_since is not None:
            print(f"[sparta] MLflow tracking at {self.uri} answers again after "
                  f"{time.monotonic() - self.down_since:.0f} s", file=sys.stderr, flush=True)
            self.down_since = None
        return result

    def _try(self, what: str, fn, *args, **kwargs):
        """`_call`, None when the store is down (for what is not worth keeping: params, tags, artifacts)."""
        try:
            return self._call(what, fn, *args, **kwargs)
        except StoreDown:
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

        return self._try("open a run", open_) is True

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
            self._try("log params", lambda c, chunk: c.log_batch(self.run_id, params=chunk), batch[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._try("set tags", lambda c: c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        if step <= self._logged_through or self.switched_off:
            return
        now = int(time.time() * 1000)
        self._kept.append((step, [Metric(k, float(v), now, step) for k, v in metrics.items()]))
        if len(self._kept) > MAX_KEPT_BATCHES:
            self._kept.popleft()
            self.lost_batches += 1
        self.flush()

    def flush(self, now: bool = False) -> None:
        """Send the kept metrics, oldest first, while the store answers; `now`: try even if a failure
        was recent (the last chance, at the end of training)."""
        if now and self.down_since is not None:
            self._next_try = 0.0
        try:
            while self._kept:
                step, batch = self._kept[0]
                self._call("log metrics", lambda c: c.log_batch(self.run_id, metrics=batch))
                self._kept.popleft()
                self.recorded_through = max(self.recorded_through, step)
        except StoreDown:
            pass

    def rewind(self, step: int) -> None:
        """A resumed run re-runs the steps after its checkpoint's `step`: forget the points logged after
        it, so that the history keeps one point per step, the re-run's (TensorBoard's `purge_step`).
        MLflow has no API to delete points: a SQL store (the default SQLite file, a database URI) is
        edited directly; other stores (a tracking server) keep theirs and the re-run does not log
        those steps again."""

        def rewind_(client):
            store = client._tracking_client.store
            if hasattr(store, "ManagedSessionMaker"):
                _delete_points_after(store, self.run_id, step)
                return
            logged = [m.step for m in client.get_metric_history(self.run_id, "train/loss")]
            self._logged_through = max(logged, default=float("-inf"))
            if self._logged_through > step:
                print(f"[sparta] the MLflow store at {self.uri} cannot delete metric points: steps {step + 1} to "
                      f"{self._logged_through} keep the values logged before the restart", flush=True)

        self._try("rewind the metric history", rewind_)

    def log_text(self, text: str, name: str) -> None:
        self._try(f"log {name}", lambda c: c.log_text(self.run_id, text, name))

    def log_files(self, files: list[Path], folder: str) -> None:
        """Files as artifacts of the run, under `folder`."""
        for file in files:
            self._try(f"log {folder}/{file.name}", lambda c, file=file: c.log_artifact(self.run_id, str(file), folder))

    def log_loss_curve(self) -> None:
        """Plot the run's whole train/val loss history (all launches of it) as loss_curve.png."""

        def history(client):
            series = {}
            for key in ("train/loss", "val/loss"):
                points = sorted(client.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))
                if points:
                    series[key] = ([m.step for m in points], [m.value for m in points])
            return series

        series = self._try("read the loss history", history)
        if series:  # none when the run stopped before its first logging step
            from sparta.platform import plots

            self.log_figure(plots.loss_curve(series), "loss_curve.png")

    def log_figure(self, figure, name: str) -> None:
        """A `sparta.platform.plots` figure as a PNG artifact of the run."""

        def log(client):
            from sparta.platform.plots import save

            with tempfile.TemporaryDirectory() as tmp:
                client.log_artifact(self.run_id, str(save(figure, Path(tmp) / name)))

        self._try(f"log {name}", log)

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

    def end_run(self, status: str) -> bool:
        """Mark the run ended; False if the store could not be reached."""
        try:
            self._call("end the run", lambda c: c.set_terminated(self.run_id, status=status))
            return True
        except StoreDown:
            return False


def _delete_points_after(store, run_id: str, step: int) -> None:
    """Delete a run's metric points after `step` from a SQL tracking store, and point each metric's
    "latest value" (what the runs table shows) at its newest remaining point."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    with store.ManagedSessionMaker() as session:
        later = session.query(SqlMetric).filter(SqlMetric.run_uuid == run_id, SqlMetric.step > step)
        keys = [key for (key,) in later.with_entities(SqlMetric.key).distinct()]
        later.delete(synchronize_session=False)
        for key in keys:
            newest = (session.query(SqlMetric).filter(SqlMetric.run_uuid == run_id, SqlMetric.key == key)
                      .order_by(SqlMetric.step.desc(), SqlMetric.timestamp.desc()).first())
            latest = session.query(SqlLatestMetric).filter(SqlLatestMetric.run_uuid == run_id, SqlLatestMetric.key == key)
            if newest is None:
                latest.delete(synchronize_session=False)
            else:
                latest.update({"value": newest.value, "timestamp": newest.timestamp, "step": newest.step,
                               "is_nan": newest.is_nan}, synchronize_session=False)


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
