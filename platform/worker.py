"""The training loop that runs in every Ray Train worker: one DeepSpeed engine per worker.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed wraps the
model on top of it. Checkpoints are DeepSpeed checkpoints reported to Ray Train, which keeps the
newest `keep_checkpoints` and hands the latest back after a restart, so a resumed worker group
continues at the next step with the same weights, optimizer state, LR schedule and batches.
"""

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sparta.platform.config import JobConfig, deepspeed_config
from sparta.platform.data import TokenBatches, tokenize_corpus
from sparta.platform.lm import TransformerLM, next_token_loss
from sparta.platform.tracking import Tracker, system_info

# Ray Train routes worker logging (and print) to the driver's console and to its log files.
log = logging.getLogger("sparta")


@dataclass(frozen=True)
class WorkerArgs:
    job: JobConfig
    use_gpu: bool
    tracking_uri: str
    mlflow_run_id: str | None
    run_dir: str  # survives worker restarts: holds the fault drill's marker


class InjectedFailure(RuntimeError):
    """Raised once by `trainer.inject_failure_at_step` to exercise restart-and-resume."""


def train_worker(args: WorkerArgs) -> None:
    import deepspeed
    import ray.train

    job, trainer = args.job, args.job.trainer
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.use_gpu else torch.device("cpu")
    deepspeed.utils.logger.setLevel("WARNING")

    splits = tokenize_corpus(job.data.corpus, job.data.val_fraction)
    torch.manual_seed(trainer.seed)  # identical initial weights on every rank
    model = TransformerLM(job.lm_config(splits.vocab_size))
    ds = job.deepspeed
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, ds.optimizer.weight_decay),
        config=deepspeed_config(ds, trainer.max_steps, args.use_gpu),
        dist_init_required=False,
    )
    step = restore_checkpoint(engine)

    train_batches = TokenBatches(splits.train, job.data.seq_len, ds.micro_batch_size, rank, world_size, trainer.seed)
    val_batches = TokenBatches(splits.val, job.data.seq_len, ds.micro_batch_size, rank, world_size, trainer.seed,
                               shuffle=False)
    accumulation = ds.gradient_accumulation_steps
    tokens_per_step = world_size * accumulation * ds.micro_batch_size * job.data.seq_len

    tracker = Tracker(args.tracking_uri, args.mlflow_run_id) if rank == 0 and args.mlflow_run_id else None
    if tracker:
        tracker.set_tags({**system_info(), "system.world_size": world_size,
                          "system.device": torch.cuda.get_device_name() if args.use_gpu else "cpu"})
    progress = Progress(trainer.max_steps, step) if rank == 0 else None

    # DeepSpeed reports the global gradient norm from its ZeRO and bf16/fp16 optimizers; fp32 without
    # ZeRO clips without keeping it, so the loop measures it there.
    reports_grad_norm = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
    interval_loss, interval_steps = torch.zeros((), device=device), 0
    while step < trainer.max_steps:
        step += 1
        if step == trainer.inject_failure_at_step and rank == 0:
            inject_failure_once(Path(args.run_dir), step)
        for micro in range(accumulation):
            inputs, targets = train_batches.get((step - 1) * accumulation + micro)
            loss = next_token_loss(engine(inputs.to(device)), targets.to(device))
            engine.backward(loss)
            if micro == accumulation - 1 and not reports_grad_norm:
                own_grad_norm = gradient_norm(model)  # whole, all-reduced gradients at the boundary
            engine.step()
            interval_loss += loss.detach() / accumulation
        interval_steps += 1

        metrics = {}
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            dist.all_reduce(interval_loss)
            metrics["train/loss"] = interval_loss.item() / (world_size * interval_steps)
            metrics["train/lr"] = engine.get_lr()[0]
            metrics["train/grad_norm"] = float(engine.get_global_grad_norm() if reports_grad_norm else own_grad_norm)
            interval_loss.zero_()
            interval_steps = 0
        if step % trainer.eval_every == 0 or step == trainer.max_steps:
            metrics["val/loss"] = evaluate(engine, val_batches, trainer.eval_batches, device)
        if progress and metrics:
            metrics["train/tokens_per_s"] = progress.update(step, tokens_per_step, metrics)
        if tracker and metrics:
            tracker.log_metrics(metrics, step)
        if step % trainer.checkpoint_every == 0 or step == trainer.max_steps:
            save_checkpoint(engine, step, {"step": step, **metrics})


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]))


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings), not norm gains: the usual LLM recipe."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(engine, batches: TokenBatches, max_batches: int, device: torch.device) -> float:
    engine.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, batch count
    for index in range(min(max_batches, batches.num_batches)):
        inputs, targets = batches.get(index)
        total[0] += next_token_loss(engine(inputs.to(device)), targets.to(device)).double()
        total[1] += 1
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def save_checkpoint(engine, step: int, metrics: dict) -> None:
    """All ranks write their DeepSpeed shards locally; Ray Train uploads them as one checkpoint.

    The upload finishes before `report` returns and only then does the checkpoint become the one a
    restart resumes from, so a crash mid-save never leaves a half-written "latest" checkpoint.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sparta-ckpt-") as local_dir:
        engine.save_checkpoint(local_dir, tag=f"step_{step:07d}", client_state={"step": step})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_dir))


def restore_checkpoint(engine) -> int:
    """Load Ray Train's latest checkpoint into the engine if there is one; returns the step it ended."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        load_path, client_state = engine.load_checkpoint(directory)
    if load_path is None:
        raise RuntimeError(f"checkpoint {checkpoint.path}: no DeepSpeed checkpoint inside")
    return client_state["step"]


def inject_failure_once(run_dir: Path, step: int) -> None:
    marker = run_dir / f"injected_failure_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise InjectedFailure(f"trainer.inject_failure_at_step={step}: injected failure (happens once per run)")


class Progress:
    """Rank 0's console line: step, loss, tokens/s and ETA since this launch (or resume) started."""

    def __init__(self, max_steps: int, first_step: int):
        self.max_steps, self.first_step = max_steps, first_step
        self.start = self.last = time.perf_counter()
        self.last_step = first_step
        if first_step:
            log.info(f"[sparta] resumed from the checkpoint at step {first_step}")

    def update(self, step: int, tokens_per_step: int, metrics: dict) -> float:
        now = time.perf_counter()
        tokens_per_s = tokens_per_step * (step - self.last_step) / max(now - self.last, 1e-9)
        eta = (now - self.start) / (step - self.first_step) * (self.max_steps - step)
        parts = [f"step {step:>{len(str(self.max_steps))}}/{self.max_steps}"]
        if "train/loss" in metrics:
            parts += [f"loss {metrics['train/loss']:.4f}", f"lr {metrics['train/lr']:.2e}",
                      f"grad {metrics['train/grad_norm']:.3f}"]
        if "val/loss" in metrics:
            parts.append(f"val {metrics['val/loss']:.4f} (ppl {math.exp(metrics['val/loss']):.1f})")
        parts += [f"{tokens_per_s / 1000:.1f}k tok/s", f"eta {format_seconds(eta)}"]
        log.info("[sparta] " + " | ".join(parts))
        self.last, self.last_step = now, step
        return tokens_per_s


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
