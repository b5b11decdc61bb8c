"""The driver of a training job: plan the workers, connect to Ray, open the MLflow run, run the
Ray Train `TorchTrainer`, print where everything went.

Everything that can be wrong with the request (config values, worker counts against the machine or
the cluster) is checked here before a single worker starts.
"""

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from sparta.platform import checkpoint, reaper
from sparta.platform.config import ConfigError, JobConfig, ParallelConfig, deepspeed_config
from sparta.platform.console import CONSOLE_FILE, ConsoleTail, quiet_driver
from sparta.platform.data import Corpus, count_windows, open_corpus, prepare_corpus
from sparta.platform.runs import CHECKPOINT_DIR_TAG, resolve
from sparta.platform.tracking import Tracker, default_tracking_uri
from sparta.platform.worker import WorkerArgs, read_outcome, train_worker


class DivergedError(RuntimeError):
    """The run's loss or gradients stopped being finite (`worker.divergence`): its weights are lost from that step on."""


@dataclass(frozen=True)
class JobResult:
    run_name: str
    steps: int
    val_loss: float | None
    checkpoint: Path | None
    tracking_uri: str
    mlflow_run_id: str | None


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int
    use_gpu: bool


def plan_workers(job: JobConfig, resources: dict) -> WorkerPlan:
    """Resolve `trainer.num_workers` / `trainer.use_gpu` against what the cluster offers (Ray's resource dict)."""
    trainer = job.trainer
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    use_gpu = gpus > 0 if trainer.use_gpu is None else trainer.use_gpu
    if use_gpu and gpus == 0:
        raise ConfigError("trainer.use_gpu=True: expected GPUs, but the Ray cluster has none")
    num_workers = trainer.num_workers or (gpus if use_gpu else 2)
    if use_gpu and num_workers > gpus:
        raise ConfigError(f"trainer.num_workers={num_workers}: expected at most {gpus}, one worker per GPU")
    if num_workers * trainer.cpus_per_worker > cpus:
        raise ConfigError(
            f"trainer.num_workers={num_workers}: {num_workers} workers x trainer.cpus_per_worker="
            f"{trainer.cpus_per_worker:g} need {num_workers * trainer.cpus_per_worker:g} CPUs, the cluster has {cpus}; "
            f"expected trainer.num_workers <= {int(cpus // trainer.cpus_per_worker)}")
    check_layout(job.parallel, num_workers)
    deepspeed_config(job.deepspeed, trainer.max_steps, use_gpu, num_workers)  # raises on a precision the workers can't run
    return WorkerPlan(num_workers, use_gpu)


def find_init_checkpoint(job: JobConfig, root: Path) -> str | None:
    """`trainer.init_from` as a checkpoint directory, found before Ray starts (a run name or id is looked
    up in this job's MLflow store)."""
    if job.trainer.init_from is None:
        return None
    try:
        directory, _ = resolve(job.trainer.init_from, default_tracking_uri(job.tracking.uri, root))
    except FileNotFoundError as error:
        raise ConfigError(f"trainer.init_from={job.trainer.init_from!r}: {error}") from None
    return str(directory)


def check_layout(parallel: ParallelConfig, num_workers: int) -> None:
    """parallel.data x parallel.expert x parallel.sequence must be the worker count."""
    sharded = parallel.expert * parallel.sequence
    if num_workers % sharded:
        raise ConfigError(f"parallel.expert={parallel.expert} x parallel.sequence={parallel.sequence}: expected a "
                          f"divisor of the {num_workers} workers (trainer.num_workers)")
    if parallel.data is not None and parallel.data * sharded != num_workers:
        raise ConfigError(f"parallel.data={parallel.data}: expected {num_workers // sharded}, so that parallel.data x "
                          f"parallel.expert x parallel.sequence = the {num_workers} workers (or null to derive it)")


def joins_cluster(job: JobConfig) -> bool:
    return job.cluster.address is not None or bool(os.environ.get("RAY_ADDRESS"))


def connect_ray(job: JobConfig, corpus: Corpus | None) -> WorkerPlan:
    """Join the configured cluster, or start a Ray instance sized to this machine; plan the workers
    against its resources and check that the corpus fills their batches, before any worker starts
    (and, locally, before Ray starts)."""
    import ray
    import torch

    output = {"log_to_driver": job.verbose, "logging_level": logging.INFO if job.verbose else logging.WARNING}
    if joins_cluster(job):
        ray.init(address=job.cluster.address, **output)  # None: $RAY_ADDRESS
        plan = plan_workers(job, ray.cluster_resources())
        check_batches(job, corpus, plan.num_workers)
        return plan
    machine = {"CPU": os.cpu_count(), "GPU": torch.cuda.device_count()}
    plan = plan_workers(job, machine)
    check_batches(job, corpus, plan.num_workers)
    ray.init(address="local", num_cpus=machine["CPU"], num_gpus=machine["GPU"], **output)
    reaper.start_for_this_process()  # stops this Ray instance if the driver is killed
    return plan


def check_batches(job: JobConfig, corpus: Corpus | None, num_workers: int) -> None:
    """Both splits hold at least one global micro-batch of windows or clips (else every worker would fail on it)."""
    shards = job.parallel.data_shards(num_workers)
    batch = job.deepspeed.micro_batch_size * shards
    if corpus is None:  # the video source: clips without end, a fixed validation set
        if job.data.val_clips < batch:
            raise ConfigError(f"data.val_clips={job.data.val_clips}: expected at least one global micro-batch, {batch} "
                              "clips (deepspeed.micro_batch_size x the data shards)")
        return
    try:
        for split, tokens in (("the train", corpus.train), ("the validation", corpus.val)):
            count_windows(len(tokens), job.data.seq_len, job.deepspeed.micro_batch_size, shards, split)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_shared_root(root: Path, plan: WorkerPlan) -> None:
    """On a Ray cluster, every node that can hold a worker must see `cluster.root`: the workers read the
    corpus there and write the checkpoints and the console file the driver reads. A node-local path (the
    default /tmp/sparta on several machines, a relative root under `ray job submit`) would fail in every
    worker, after they all started, with a missing-file error; this says it first, naming the nodes."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needed = "GPU" if plan.use_gpu else "CPU"
    nodes = {f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})": n["NodeID"] for n in ray.nodes()
             if n["Alive"] and n["Resources"].get(needed, 0) > 0}
    marker = root / f".sparta-shared-{uuid.uuid4().hex}"
    marker.touch()
    try:
        exists = ray.remote(num_cpus=0, max_retries=0)(_exists)
        answers = {name: exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                   .remote(str(marker)) for name, node_id in nodes.items()}
        ready, _ = ray.wait(list(answers.values()), num_returns=len(answers), timeout=120)
        blind = [name for name, ref in answers.items() if ref not in ready or not ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"cluster.root={root}: not seen by {len(blind)} of the {len(nodes)} Ray nodes that can run a "
                          f"worker ({', '.join(blind)}); expected storage that every node mounts at that path (NFS, "
                          "a ReadWriteMany volume), given as an absolute path")


def _exists(path: str) -> bool:
    return Path(path).exists()


def ray_logs_dir() -> str:
    """Where Ray keeps the logs of this driver's Ray instance (on a cluster: of each node, `ray logs`)."""
    import ray

    node = ray._private.worker.global_worker.node
    return str(Path(node.get_session_dir_path()) / "logs") if node else "ray logs"


def run(job: JobConfig, default_run_name: str, params: dict, resolved_yaml: str) -> JobResult:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = Path(job.cluster.root).resolve()
    root.mkdir(parents=True, exist_ok=True)  # launch/train.py has checked that it can be
    run_name = job.run_name or default_run_name
    run_dir = root / "ray" / run_name  # the run's checkpoints, console file and fault-drill marker

    if not job.verbose:
        quiet_driver()
    data = job.data
    corpus_dir, corpus = "", None  # the video source makes its clips in the workers
    if not data.is_video:
        corpus_dir = prepare_corpus(data.corpus, data.vocab_size, data.val_fraction, data.token_dtype, root / "data")
        corpus = open_corpus(corpus_dir)
    init_checkpoint = find_init_checkpoint(job, root)
    plan = connect_ray(job, corpus)
    if joins_cluster(job):
        check_shared_root(root, plan)
    tracker = Tracker(default_tracking_uri(job.tracking.uri, root), retry_s=job.tracking.retry_s)
    resumed = tracker.open_run(job.tracking.experiment, run_name, root / "mlartifacts")
    if not resumed:
        tracker.log_params({**params, **(corpus.params if corpus else {"data.tokens_per_clip": job.tokens_per_sample()})})
        tracker.log_text(resolved_yaml, "config.yaml")
        tracker.set_tags({CHECKPOINT_DIR_TAG: str(run_dir)})
    p = job.parallel
    layout = (f" (data {p.data_shards(plan.num_workers) // p.expert} x expert {p.expert} x sequence {p.sequence})"
              if p.expert * p.sequence > 1 else "")
    print(f"[sparta] run {run_name}: {plan.num_workers} {'GPU' if plan.use_gpu else 'CPU'} workers{layout}, "
          f"ZeRO-{job.deepspeed.zero_stage}, {job.trainer.max_steps} steps; checkpoints in {run_dir}", flush=True)
    if not job.verbose:
        print(f"[sparta] Ray, Ray Train and DeepSpeed output: {ray_logs_dir()} (verbose=true shows it here); "
              f"this console: {run_dir / CONSOLE_FILE}", flush=True)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=WorkerArgs(job, plan.use_gpu, tracker.uri, tracker.run_id,
                                     str(run_dir), str(corpus_dir), init_checkpoint),
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": job.trainer.cpus_per_worker,
                                                           **({"GPU": 1} if plan.use_gpu else {})}),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(root / "ray"),
            failure_config=FailureConfig(max_failures=job.trainer.max_failures),
        ),
    )
    try:
        with nullcontext() if job.verbose else ConsoleTail(run_dir):
            trainer.fit()
    except BaseException:
        tracker.end_run("FAILED")
        raise
    finally:
        ray.shutdown()
    tracker.log_loss_curve()
    metrics = read_outcome(run_dir)
    if "diverged" in metrics:
        tracker.end_run("FAILED")
        raise DivergedError(metrics["diverged"])
    closed = tracker.end_run("FINISHED")

    outcome = JobResult(run_name, metrics.get("step", 0), metrics.get("val/loss"),
                        checkpoint.latest(run_dir), tracker.uri, tracker.run_id)
    print_summary(outcome, job.tracking.experiment, tracking_gaps(metrics, closed))
    return outcome


def tracking_gaps(final_metrics: dict, closed: bool) -> list[str]:
    """What of the run did not reach MLflow (the store was unreachable at times), in words."""
    gaps = []
    if final_metrics.get("mlflow/unsent_batches"):
        gaps.append(f"{final_metrics['mlflow/unsent_batches']:.0f} metric batches were not recorded (the store did not "
                    f"answer again; recorded through step {final_metrics.get('mlflow/recorded_through', 0):.0f})")
    if not closed:
        gaps.append("the run could not be marked finished (the store did not answer at the end): it shows RUNNING")
    return gaps


def print_summary(result: JobResult, experiment: str, tracking_gaps: list[str]) -> None:
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"[sparta] run {result.run_name} finished at step {result.steps}{val}", flush=True)
    print(f"[sparta] checkpoint: {result.checkpoint}")
    if result.mlflow_run_id:
        print(f"[sparta] MLflow run {result.mlflow_run_id} in experiment '{experiment}' at {result.tracking_uri}")
        for gap in tracking_gaps:
            print(f"[sparta] MLflow: {gap}")
        if result.tracking_uri.startswith("sqlite:"):
            print(f"[sparta] open the UI: mlflow ui --backend-store-uri {result.tracking_uri} --port 5000")
    else:
        print("[sparta] MLflow tracking was off for this run (see the message above)")
