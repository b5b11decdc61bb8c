"""The training loop that runs in every Ray Train worker: one DeepSpeed engine per worker.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU); megatron-core cuts the
expert-parallel groups out of it (`parallel.py`) and DeepSpeed wraps the model on top. The model is
used only through its contract: `engine(inputs, targets)` gives the loss and a dict of metrics, and
`model.flops_per_token` the FLOPs for MFU. Checkpoints are layout-independent (`checkpoint.py`),
written by rank 0 in the background into the run directory, the newest `keep_checkpoints` kept. A
worker group that Ray Train restarts after a failure, or a relaunch with the same run name, resumes
from the newest complete one: the next step with the same weights, optimizer state, LR schedule and
batches, at any expert-parallel size.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.profiler import record_function

from sparta.moe import CLS_CHUNK_SIZES, ChunkSparsityScheduler, MoE
from sparta.platform import checkpoint
from sparta.platform.config import JobConfig, deepspeed_config
from sparta.platform.console import log_to_console_file
from sparta.platform.data import Prefetched, TokenBatches, open_corpus
from sparta.platform.lm import named_moe_metrics
from sparta.platform.models import build_model
from sparta.platform.parallel import initialize_parallel, mark_expert_parameters
from sparta.platform.plots import ZERO_COMPUTATION_KEYS
from sparta.platform.profiling import StepProfiler
from sparta.platform.tracking import Tracker, system_info
from sparta.platform.video_data import VideoBatches

# Ray Train routes worker logging (and print) to the driver's console and to its log files.
log = logging.getLogger("sparta")

OUTCOME_FILE = "outcome.json"  # in the run directory: the last run's final step and metrics

# Dense bf16 tensor-core peak (datasheet, no sparsity) by device name, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0}


@dataclass(frozen=True)
class WorkerArgs:
    job: JobConfig
    use_gpu: bool
    tracking_uri: str
    mlflow_run_id: str | None
    run_dir: str  # survives worker restarts: the run's checkpoints and the fault drill's marker
    corpus_dir: str  # the prepared token cache (`sparta.platform.data.prepare_corpus`)
    init_checkpoint: str | None = None  # trainer.init_from, resolved by the driver to a checkpoint directory


class InjectedFailure(RuntimeError):
    """Raised once by `trainer.inject_failure_at_step` to exercise restart-and-resume."""


def train_worker(args: WorkerArgs) -> None:
    """Ray Train's training function: `train` with its errors on the run's console too."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    log_to_console_file(Path(args.run_dir), rank)
    try:
        train(args)
    except Exception as error:
        log.error(f"[sparta] rank {rank} failed: {type(error).__name__}: {error}")
        raise


def train(args: WorkerArgs) -> None:
    import deepspeed
    import ray.train

    job, trainer = args.job, args.job.trainer
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.use_gpu else torch.device("cpu")
    deepspeed.utils.logger.setLevel("WARNING")

    layout = initialize_parallel(job.parallel.expert, job.parallel.sequence, job.deepspeed.zero_stage)
    ep_group = layout.ep_group
    ds = job.deepspeed
    # sequence-parallel ranks read the same samples
    train_batches, val_batches, model_config = open_data(job, args.corpus_dir, layout.data_rank, layout.data_shards,
                                                         pin_memory=args.use_gpu)
    torch.manual_seed(trainer.seed)  # identical initial weights on every rank, whatever the layout
    model = build_model(model_config, ep_group, layout.sp_group)
    if layout.expert_groups is not None:
        model.add_module("expert_groups", layout.expert_groups)
        mark_expert_parameters(model, layout.expert_groups.expert_group_name)
    run_dir = Path(args.run_dir)
    resume_from = newest_checkpoint(run_dir)
    if args.init_checkpoint and resume_from is None:  # before DeepSpeed copies the weights into its optimizer
        checkpoint.load_model_file(model, args.init_checkpoint, ep_group, f"trainer.init_from={job.trainer.init_from}")
        log.info(f"[sparta] weights from {args.init_checkpoint} (trainer.init_from); optimizer and step start fresh")
    if trainer.activation_checkpointing:
        for block in model.blocks:
            block.checkpointed = True
    cuda_graphs = trainer.cuda_graphs and args.use_gpu
    if trainer.compile:  # in place: parameter names (checkpoints) stay the same
        model.compile(mode="reduce-overhead" if cuda_graphs else None)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, ds.optimizer.weight_decay),
        config=deepspeed_config(ds, trainer.max_steps, args.use_gpu, dist.get_world_size()),
        dist_init_required=False,
    )
    accumulation = ds.gradient_accumulation_steps
    state = restore_checkpoint(engine, model, ep_group, accumulation, resume_from)
    step = first_step = state.get("step", 0)
    schedule = chunk_sparsity_schedule(job, model, state.get("chunk_sparsity_schedule"))

    seq_len = job.tokens_per_sample()
    tokens_per_step = layout.data_shards * accumulation * ds.micro_batch_size * seq_len

    tracker = (Tracker(args.tracking_uri, args.mlflow_run_id, job.tracking.retry_s)
               if rank == 0 and args.mlflow_run_id else None)
    if tracker and step:
        tracker.rewind(step)
    if tracker:
        tracker.set_tags({**system_info(), "system.world_size": world_size,
                          "system.device": torch.cuda.get_device_name() if args.use_gpu else "cpu"})
    progress = Progress(trainer.max_steps, step, perplexity=not job.data.is_video) if rank == 0 else None
    writer = checkpoint.CheckpointWriter(run_dir, trainer.keep_checkpoints) if rank == 0 else None
    peak = peak_tflops(trainer.peak_tflops, args.use_gpu)
    expert_loads = ExpertLoadHistory.from_state(state.get("expert_load"))
    # What a checkpoint needs to be found and rebuilt on its own (launch/export.py, launch/eval.py).
    run_record = {"model_config": asdict(model.cfg), "corpus_dir": args.corpus_dir, "seq_len": seq_len,
                  "video_data": asdict(job.data.video(trainer.seed)) if job.data.is_video else None,
                  "mlflow_run_id": args.mlflow_run_id, "tracking_uri": args.tracking_uri}

    # DeepSpeed reports the global gradient norm from its ZeRO and bf16/fp16 optimizers; fp32 without
    # ZeRO clips without keeping it, so the loop measures it there.
    reports_grad_norm = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()

    def global_grad_norm() -> float:  # of the last optimizer step; reading it waits for the GPU
        return float(engine.get_global_grad_norm() if reports_grad_norm else own_grad_norm)

    interval, metrics, evaluated, diverged = MetricSums(), {}, False, None
    profiler = (StepProfiler(trainer.profile_steps, args.use_gpu, run_dir / "profile")
                if rank == 0 and trainer.profile_steps and step < trainer.profile_steps[0] else None)
    while step < trainer.max_steps:
        step += 1
        step_start = time.perf_counter()
        if profiler:
            profiler.step_begins(step)
        if step == trainer.inject_failure_at_step and rank == 0:
            inject_failure_once(run_dir, step)
        chunk_loss = torch.zeros((), device=device)
        for micro in range(accumulation):
            with record_function("sparta/batch"):
                inputs, targets = train_batches.get((step - 1) * accumulation + micro)
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with record_function("sparta/forward"):
                if cuda_graphs:  # the previous step's graph outputs may be overwritten from here on
                    torch.compiler.cudagraph_mark_step_begin()
                loss, step_metrics = engine(inputs, targets)
            with record_function("sparta/backward"):
                engine.backward(loss)
            if micro == accumulation - 1 and not reports_grad_norm:
                own_grad_norm = gradient_norm(model)  # whole, all-reduced gradients at the boundary
            with record_function("sparta/optimizer"):
                engine.step()
            with record_function("sparta/metrics"):
                interval.add(step_metrics, 1 / accumulation)
            if schedule:
                chunk_loss += step_metrics["moe/layers/chunk_sparsity_loss"].mean() / accumulation
        if schedule:
            dist.all_reduce(chunk_loss)
            set_chunk_sparsity_coef(model, schedule.update(chunk_loss.item() / world_size))

        if trainer.compile and step == first_step + 1 and progress:  # this step compiled the model
            compile_s = time.perf_counter() - step_start
            progress.discount(compile_s, steps=1)
            log.info(f"[sparta] step {step} compiled the model in {compile_s:.1f}s (left out of tokens/s and MFU)")
            if tracker:
                tracker.log_metrics({"train/compile_s": compile_s}, step)

        metrics = {}
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            metrics = named_moe_metrics(interval.mean(), model.moe_layers)
            expert_loads.add(step, {k: metrics.pop(k) for k in list(metrics) if k.endswith("/expert_load")})
            metrics = {f"train/{k}" if k in ("loss", "aux_loss") else k: v for k, v in metrics.items()}
            if schedule:
                metrics["moe/chunk_sparsity_coef"] = schedule.coef
            metrics["train/lr"] = engine.get_lr()[0]
            metrics["train/grad_norm"] = global_grad_norm()
            if args.use_gpu:  # what the caching allocator holds at most (CUDA graphs' pools included): the OOM margin
                metrics["gpu/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            diverged = divergence(step, {k: metrics[k] for k in ("train/loss", "train/grad_norm") if k in metrics})
            if diverged:
                break
        if step % trainer.eval_every == 0 or step == trainer.max_steps:
            eval_start = time.perf_counter()
            with record_function("sparta/evaluate"):
                metrics["val/loss"] = evaluate(engine, val_batches, trainer.eval_batches, device, cuda_graphs)
            if trainer.compile and not evaluated and progress:  # the first one compiled the eval graph
                metrics["val/compile_s"] = time.perf_counter() - eval_start
                progress.discount(metrics["val/compile_s"])
            evaluated = True
        if trainer.compile and metrics:  # constant after the warm-up unless something recompiles
            metrics["train/compiled_graphs"] = counters["stats"]["unique_graphs"]
        if progress and metrics:
            tokens_per_s = progress.tokens_per_s(step, tokens_per_step)
            metrics["train/tokens_per_s"] = tokens_per_s
            if peak and "train/loss" in metrics:
                metrics["train/mfu"] = tokens_per_s / world_size * model.flops_per_token(
                    seq_len, layer_experts_per_token(metrics)) / (peak * 1e12)
            progress.show(step, metrics)
        if tracker and metrics:
            tracker.log_metrics(metrics, step)
        if step % trainer.checkpoint_every == 0 or step == trainer.max_steps:
            diverged = divergence(step, {"train/grad_norm": global_grad_norm()})
            if diverged:
                break
            paused = time.perf_counter()
            with record_function("sparta/checkpoint"):
                save_checkpoint(engine, model, ep_group, writer,
                                {"step": step, **run_record, "expert_load": expert_loads.state(),
                                 "chunk_sparsity_schedule": schedule.state_dict() if schedule else None})
            if tracker:  # what the checkpoint cost the training loop (the files are written meanwhile)
                tracker.log_metrics({"train/checkpoint_pause_s": time.perf_counter() - paused}, step)
        writing = time.perf_counter()
        profiled = profiler.step_ends(step) if profiler else None
        if profiled:
            if progress:  # writing the tables and the trace is no training time
                progress.discount(time.perf_counter() - writing)
            profile_metrics, files = profiled
            log.info(f"[sparta] profile of steps {trainer.profile_steps[0]}-{step}: "
                     + ", ".join(f"{k.removeprefix('profile/')} {v:.3g}" for k, v in profile_metrics.items())
                     + f"; tables and trace in {files[0].parent}" + (" and the run's profile/" if tracker else ""))
            if tracker:
                tracker.log_metrics(profile_metrics, step)
                tracker.log_files(files, "profile")
    if writer:
        writer.wait()
    if rank == 0:
        outcome = {"step": step, **{k: v for k, v in metrics.items() if k in ("train/loss", "val/loss")}}
        if diverged:
            log.error(f"[sparta] stopped: {diverged}")
            outcome["diverged"] = diverged
        if tracker:
            tracker.log_moe_plots(expert_loads, last_layer_cls(metrics))
            tracker.flush(now=True)
            outcome.update({"mlflow/unsent_batches": tracker.unsent_batches,
                            "mlflow/recorded_through": tracker.recorded_through})
        write_outcome(run_dir, outcome)


def open_data(job: JobConfig, corpus_dir: str, shard: int, shards: int, pin_memory: bool):
    """This data shard's train and validation batches (`get(index) -> (inputs, targets)`) and the model
    config they fit: token windows of the prepared corpus, or clips of the procedural video source.
    The training batches are made a step ahead (in page-locked memory for a GPU)."""
    ds, seed = job.deepspeed, job.trainer.seed
    if job.data.is_video:
        video = job.data.video(seed)
        return (Prefetched(VideoBatches(video, ds.micro_batch_size, shard, shards, "train"), pin_memory),
                VideoBatches(video, ds.micro_batch_size, shard, shards, "val"), job.model_config())
    corpus = open_corpus(Path(corpus_dir))
    seq_len = job.data.seq_len
    return (Prefetched(TokenBatches(corpus.train, seq_len, ds.micro_batch_size, shard, shards, seed), pin_memory),
            TokenBatches(corpus.val, seq_len, ds.micro_batch_size, shard, shards, seed, shuffle=False),
            job.model_config(corpus.vocab_size, corpus.eot_id))


class MetricSums:
    """Running sums of the model's metrics over a logging interval, on the device (no host sync per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0.0

    def add(self, metrics: dict[str, torch.Tensor], weight: float) -> None:
        """The known metrics are summed by one multi-tensor kernel (a host that launched a kernel or two
        per metric would pace the step)."""
        values = {key: value.detach().float() for key, value in metrics.items()}
        known = [key for key in values if key in self.sums]
        if known:
            torch._foreach_add_([self.sums[k] for k in known], [values[k] for k in known], alpha=weight)
        for key in values.keys() - self.sums.keys():
            self.sums[key] = values[key] * weight
        self.steps += weight

    def mean(self, all_ranks: bool = True) -> dict[str, float | torch.Tensor]:
        """Mean per step (and rank): scalars as floats, the others (per-layer stacks) as CPU tensors; resets."""
        keys = sorted(self.sums)
        flat = torch.cat([self.sums[k].reshape(-1) for k in keys])
        ranks = 1
        if all_ranks:
            dist.all_reduce(flat)
            ranks = dist.get_world_size()
        flat = (flat / (ranks * self.steps)).cpu()
        means = {}
        for key, part in zip(keys, flat.split([self.sums[k].numel() for k in keys])):
            means[key] = part.item() if self.sums[key].dim() == 0 else part.view(self.sums[key].shape)
        self.sums, self.steps = {}, 0.0
        return means


def chunk_sparsity_schedule(job: JobConfig, model, state: dict | None) -> ChunkSparsityScheduler | None:
    """BlockFFN's adaptive chunk-sparsity weight (`trainer.chunk_sparsity_schedule`), restored from
    the checkpoint's state if there is one; None for other routers or when it is off."""
    settings = job.trainer.chunk_sparsity_schedule
    moe = model.cfg.moe
    if moe is None or moe.router != "blockffn" or not settings.enabled:
        return None
    schedule = ChunkSparsityScheduler(moe.chunk_sparsity_coef, stable_steps=settings.stable_steps,
                                      window_steps=settings.window_steps, max_factor=settings.max_factor,
                                      min_factor=settings.min_factor)
    if state:
        schedule.load_state_dict(state)
        set_chunk_sparsity_coef(model, schedule.coef)
    return schedule


def set_chunk_sparsity_coef(model, coef: float) -> None:
    """Every MoE layer reads its config's coefficient at each forward."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.config.chunk_sparsity_coef = coef


def layer_experts_per_token(metrics: dict) -> dict[int, float]:
    return {int(k.split("/")[1].removeprefix("layer_")): v for k, v in metrics.items()
            if k.startswith("moe/layer_") and k.endswith("/ffn_experts_per_token")}


def last_layer_cls(metrics: dict) -> dict[str, list[float]]:
    """{layer name: [CLS at chunk 2, 4, ..., 64]} from the last logged metrics."""
    layers = sorted({k.split("/")[1] for k in metrics if k.startswith("moe/layer_")})
    return {layer: [metrics[f"moe/{layer}/cls{size}"] for size in CLS_CHUNK_SIZES] for layer in layers
            if f"moe/{layer}/cls2" in metrics}


class ExpertLoadHistory:
    """Rank 0's record of every MoE layer's expert load at each logging step (checkpointed, plotted at the end)."""

    def __init__(self, steps: list[int], loads: dict[str, list[list[float]]]):
        self.steps, self.loads = steps, loads

    @classmethod
    def from_state(cls, state: dict | None) -> "ExpertLoadHistory":
        return cls(list(state["steps"]), dict(state["loads"])) if state else cls([], {})

    def add(self, step: int, loads: dict[str, torch.Tensor]) -> None:
        if not loads:
            return
        if self.steps and self.steps[-1] >= step:  # steps re-run after a restart replace the old record
            keep = sum(1 for s in self.steps if s < step)
            self.steps = self.steps[:keep]
            self.loads = {k: v[:keep] for k, v in self.loads.items()}
        self.steps.append(step)
        for key, load in loads.items():
            self.loads.setdefault(key.split("/")[1], []).append(load.tolist())

    def state(self) -> dict:
        return {"steps": self.steps, "loads": self.loads}


def peak_tflops(configured: float | None, use_gpu: bool) -> float | None:
    """The device's dense bf16 peak (trainer.peak_tflops, else looked up by name); None: MFU not logged."""
    if configured is not None or not use_gpu:
        return configured
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]))


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings), not norm gains: the usual LLM recipe. Named, as DeepSpeed's
    split of expert parameters into their own groups requires."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(engine, batches: TokenBatches | VideoBatches, max_batches: int, device: torch.device,
             cuda_graphs: bool) -> float:
    """The model's mean `loss` metric (its task loss without the MoE auxiliary losses: next-token
    cross-entropy, the diffusion bound, flow matching) over the validation batches."""
    engine.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, batch count
    for index in range(min(max_batches, batches.num_batches)):
        inputs, targets = batches.get(index)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        _, metrics = engine(inputs.to(device), targets.to(device))
        total[0] += metrics["loss"].double()
        total[1] += 1
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def save_checkpoint(engine, model, ep_group, writer: checkpoint.CheckpointWriter | None, state: dict) -> None:
    """Every rank helps gather the whole model and optimizer state onto rank 0's CPU (the only pause of
    training); rank 0's `writer` (None elsewhere) writes it in the background."""
    snapshot = checkpoint.gather(engine, model, ep_group, state, writer.host_buffers() if writer else None)
    if writer is not None:
        writer.submit(snapshot, state["step"])


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint, None for a fresh run. Rank 0 picks it, so every rank loads
    the same one whatever its view of a shared file system."""
    found = [checkpoint.latest(run_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def restore_checkpoint(engine, model, ep_group, accumulation: int, directory: Path | None) -> dict:
    """Load the run's checkpoint `directory` into the engine if there is one; returns its trainer state
    (`step`: the step it ended, ...), {} for a fresh run."""
    if directory is None:
        return {}
    state = checkpoint.load(engine, model, ep_group, directory)
    engine.global_steps, engine.micro_steps = state["step"], state["step"] * accumulation
    return state


def write_outcome(run_dir: Path, outcome: dict) -> None:
    """What the driver's summary reports (`read_outcome`), written whole or not at all."""
    partial = run_dir / f"{OUTCOME_FILE}.partial"
    partial.write_text(json.dumps(outcome))
    partial.replace(run_dir / OUTCOME_FILE)


def read_outcome(run_dir: Path) -> dict:
    path = Path(run_dir) / OUTCOME_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def divergence(step: int, values: dict[str, float]) -> str | None:
    """What went non-finite, or None. DeepSpeed runs without an overflow check (bf16 has no loss scale to
    lower; fp32 never had one), so a non-finite gradient reaches the weights. Checked at every logging and
    checkpoint step, before the checkpoint is written: the checkpoints kept are from before the divergence.
    The values are global (all ranks stop at the same step), and the workers end normally: a Ray Train
    restart from the last checkpoint would only take the same steps to the same divergence."""
    lost = ", ".join(f"{key}={value}" for key, value in values.items() if not math.isfinite(value))
    if lost:
        return (f"step {step}: {lost}: training diverged and the weights are no longer finite; resume from "
                f"the last checkpoint with a lower deepspeed.optimizer.lr or deepspeed.gradient_clipping")
    return None


def inject_failure_once(run_dir: Path, step: int) -> None:
    marker = run_dir / f"injected_failure_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise InjectedFailure(f"trainer.inject_failure_at_step={step}: injected failure (happens once per run)")


class Progress:
    """Rank 0's console line: step, loss, sparsity, tokens/s and ETA since this launch (or resume) started."""

    def __init__(self, max_steps: int, first_step: int, perplexity: bool = True):
        self.max_steps, self.first_step, self.perplexity = max_steps, first_step, perplexity
        self.start = self.last = time.perf_counter()
        self.last_step = first_step
        if first_step:
            log.info(f"[sparta] resumed from the checkpoint at step {first_step}")

    def discount(self, seconds: float, steps: int = 0) -> None:
        """Leave `seconds` (compiling, profiling), and the `steps` trained in them, out of the rate and the ETA."""
        self.start += seconds
        self.last += seconds
        self.first_step += steps
        self.last_step += steps

    def tokens_per_s(self, step: int, tokens_per_step: int) -> float:
        now = time.perf_counter()
        rate = tokens_per_step * (step - self.last_step) / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate

    def show(self, step: int, metrics: dict) -> None:
        eta = (self.last - self.start) / max(step - self.first_step, 1) * (self.max_steps - step)
        parts = [f"step {step:>{len(str(self.max_steps))}}/{self.max_steps}"]
        if "train/loss" in metrics:
            parts += [f"loss {metrics['train/loss']:.4f}", f"lr {metrics['train/lr']:.2e}",
                      f"grad {metrics['train/grad_norm']:.3f}"]
        if "moe/tls" in metrics:
            zero_computation = sum(metrics.get(key, 0.0) for key in ZERO_COMPUTATION_KEYS)
            parts.append(f"tls {metrics['moe/tls']:.1%} cls8 {metrics['moe/cls8']:.1%}"
                         + (f" zc slots {zero_computation:.1%}" if "moe/zero_slot_fraction" in metrics else ""))
        if "val/loss" in metrics:
            ppl = f" (ppl {math.exp(metrics['val/loss']):.1f})" if self.perplexity else ""  # a cross-entropy's
            parts.append(f"val {metrics['val/loss']:.4f}{ppl}")
        parts.append(f"{metrics['train/tokens_per_s'] / 1000:.1f}k tok/s")
        if "train/mfu" in metrics:
            parts.append(f"mfu {metrics['train/mfu']:.1%}")
        if "gpu/peak_reserved_gib" in metrics:
            parts.append(f"mem {metrics['gpu/peak_reserved_gib']:.1f} GiB")
        parts.append(f"eta {format_seconds(eta)}")
        log.info("[sparta] " + " | ".join(parts))


def format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"  # a short run's ETA is not "0s" throughout
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
