"""Checkpoints that do not depend on the parallel layout.

A checkpoint is one directory: `model.safetensors` (every parameter and persistent buffer whole, in
fp32: DeepSpeed's master weights, routed experts gathered from every expert-parallel rank),
`optimizer.safetensors` (Adam's two moments per parameter, whole, same names with `::exp_avg` /
`::exp_avg_sq`) and `state.json` (step, Adam's step count, LR schedule, trainer state). DeepSpeed's
own checkpoints are per-rank ZeRO partitions and hold only rank 0's experts, so a run could not
change its expert-parallel size (or its worker count) on resume; this format can, and it is also
what `launch/export.py` and `launch/eval.py` read.

Every rank takes part in `gather` and `load` (the ZeRO partitions and experts are gathered/scattered
by collectives); only rank 0 writes, in the background (`CheckpointWriter`), into `checkpoint_<step>`
folders of the run directory that exist only once complete: a restart resumes from the newest.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparta.platform.parallel import expert_parameters, gather_experts, local_experts

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{8}")


def gather(engine, model: nn.Module, ep_group, state: dict, host: "HostBuffers | None") -> "Snapshot | None":
    """The whole model and optimizer state, gathered by every rank (collectives) and copied into `host`'s
    CPU tensors on the rank that writes it; the others pass None and get None. What training does next
    cannot change the snapshot."""
    weights, moments = {}, {}

    def keep(into: dict, name: str, tensor: torch.Tensor) -> None:
        if host is not None:
            into[name] = host.copy(name, tensor)

    experts = {name for name, _ in expert_parameters(model)}
    optimizer = _link_moments(engine)
    for name, param in model.named_parameters():
        gather_ = (lambda t: gather_experts(t, ep_group)) if name in experts else (lambda t: t)
        keep(weights, name, gather_(_full_fp32(param)))
        for key in MOMENTS:
            moment = _full_moment(param, key, optimizer)
            if moment is not None:
                keep(moments, f"{name}::{key}", gather_(moment))
    for name, buffer in _persistent_buffers(model):
        keep(weights, name, buffer.detach().float())
    if host is None:
        return None
    adam_steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    state = {**state, "adam_step": adam_steps[0] if adam_steps else 0.0,
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None}
    return Snapshot(weights, moments, state)


class HostBuffers:
    """The CPU tensors that snapshots are copied into: made at the first checkpoint, refilled at every later one.

    Pinned when the tensors come from a GPU: copying into pageable memory ran at ~1.6 GB/s on an H100
    host (3.8 s of paused training for the 5.9 GB of fp32 weights and moments of a 0.49B-parameter MoE
    LM); into pinned memory the copy runs at the bus's speed. Always a copy, also of CPU tensors: the
    snapshot must not alias weights and moments that training changes while it is being written.
    """

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        held = self._tensors.get(name)
        if held is None or held.shape != tensor.shape or held.dtype != tensor.dtype:
            held = self._tensors[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        return held.copy_(tensor)


@dataclass
class Snapshot:
    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    state: dict

    def write(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.weights, str(directory / MODEL_FILE))
        save_file(self.moments, str(directory / OPTIMIZER_FILE))
        (directory / STATE_FILE).write_text(json.dumps(self.state, indent=1))


def save(engine, model: nn.Module, ep_group, directory: Path | None, state: dict) -> None:
    """Gather on every rank, write on the one passing a `directory` (synchronously)."""
    snapshot = gather(engine, model, ep_group, state, HostBuffers() if directory is not None else None)
    if directory is not None:
        snapshot.write(Path(directory))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:08d}"


def complete(run_dir: Path) -> list[Path]:
    """A run directory's complete checkpoints, oldest first. A checkpoint gets its final name only once
    all its files are written (`CheckpointWriter`), so every `checkpoint_<step>` folder is complete."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir())


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, the one a restart resumes from."""
    found = complete(run_dir)
    return found[-1] if found else None


class CheckpointWriter:
    """Writes rank 0's snapshots in a background thread while training goes on, one at a time.

    Each checkpoint is written under a temporary name and renamed when complete (atomic on a POSIX
    file system), then the oldest complete ones beyond `keep` and any temporary leftovers of a crash
    are deleted: what is on disk is at most `keep` complete checkpoints and the newest one is the one
    a restart resumes from. A write error surfaces at the next `submit` or at `wait`.
    """

    def __init__(self, run_dir: Path, keep: int):
        from concurrent.futures import ThreadPoolExecutor

        self.run_dir, self.keep = Path(run_dir), keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparta-checkpoint")
        self._pending = None
        self._host = HostBuffers()

    def host_buffers(self) -> HostBuffers:
        """Where to gather the next snapshot: the buffers of the previous one, once it is on disk."""
        self.wait()
        return self._host

    def submit(self, snapshot: Snapshot, step: int) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, snapshot, step)

    def wait(self) -> None:
        """Block until the checkpoint in flight is on disk (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, snapshot: Snapshot, step: int) -> None:
        final = checkpoint_dir(self.run_dir, step)
        partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        snapshot.write(partial)
        if final.exists():  # the same step written by an earlier attempt of the run
            shutil.rmtree(final)
        partial.rename(final)
        self._prune(newest=final)

    def _prune(self, newest: Path) -> None:
        stale = self.run_dir.glob("checkpoint_*.partial-*")
        for path in [*complete(self.run_dir)[:-self.keep], *stale]:
            if path != newest:
                shutil.rmtree(path, ignore_errors=True)


def load(engine, model: nn.Module, ep_group, directory: Path) -> dict:
    """Put a checkpoint's weights and optimizer state into this rank's engine, whatever layout wrote
    it; returns its `state.json`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [f for f in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory}: missing {', '.join(missing)} (not a sparta checkpoint)")
    weights, moments = load_file(str(directory / MODEL_FILE)), load_file(str(directory / OPTIMIZER_FILE))
    state = json.loads((directory / STATE_FILE).read_text())
    load_weights(model, weights, ep_group, directory)

    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    experts = {name for name, _ in expert_parameters(model)}
    optimizer = _link_moments(engine)
    adam_step = torch.tensor(state["adam_step"])
    for name, param in model.named_parameters():
        local = (lambda t: local_experts(t, ep_group)) if name in experts else (lambda t: t)
        safe_set_full_fp32_param(param, local(weights[name]).to(param.device))
        for key in MOMENTS:
            if f"{name}::{key}" not in moments:
                continue
            value = local(moments[f"{name}::{key}"]).to(param.device)
            if _partitioned(param):
                safe_set_full_optimizer_state(param, value, key)
            else:
                optimizer.state[param][key] = value.clone()
                optimizer.state[param]["step"] = adam_step  # set with every other state's step below
    for param_state in optimizer.state.values():
        if "step" in param_state:
            param_state["step"] = adam_step.clone().to(param_state["step"].device)
    if state.get("lr_scheduler") is not None:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(state["lr_scheduler"])
        scheduler.step(scheduler.last_batch_iteration)  # put that iteration's LR into the optimizer
    return state


def load_model_file(model: nn.Module, directory: Path, ep_group=None, source: Path | str | None = None) -> None:
    """`load_weights` from a checkpoint's or an export's `model.safetensors` (`source` names it in errors)."""
    from safetensors.torch import load_file

    load_weights(model, load_file(str(Path(directory) / MODEL_FILE)), ep_group, source or directory)


def load_weights(model: nn.Module, weights: dict, ep_group=None, source: Path | str = "checkpoint") -> None:
    """Copy whole fp32 weights (a checkpoint's or an export's) into `model`, keeping this rank's experts."""
    experts = {name for name, _ in expert_parameters(model)}
    expected = {name for name, _ in model.named_parameters()} | {name for name, _ in _persistent_buffers(model)}
    if expected != set(weights):
        raise ValueError(f"{source}: the weights do not match the model (missing: {sorted(expected - set(weights))[:5]}, "
                         f"unexpected: {sorted(set(weights) - expected)[:5]}); was it written for another model config?")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *_persistent_buffers(model)]:
            value = local_experts(weights[name], ep_group) if name in experts else weights[name]
            shape = tensor.ds_shape if hasattr(tensor, "ds_id") else tensor.shape
            if value.shape != shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")
            _copy_into(tensor, value)


def _copy_into(tensor: torch.Tensor, value: torch.Tensor) -> None:
    if not hasattr(tensor, "ds_id"):
        tensor.copy_(value)
        return
    import deepspeed  # a ZeRO-3 partition: gather it whole, write it, partition it again

    # Every rank writes its own value: the same on all ranks of the tensor's partition group (for an expert,
    # the ranks that hold the same experts), whose first rank's copy is the one kept.
    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
        tensor.data.copy_(value)


def _full_fp32(param: torch.Tensor) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return param.detach().float() if full is None else full.float()


def _full_moment(param: torch.Tensor, key: str, optimizer) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    if _partitioned(param):
        return safe_get_full_optimizer_state(param, key)
    value = optimizer.state.get(param, {}).get(key)
    return None if value is None else value.float()


def _partitioned(param: torch.Tensor) -> bool:
    """DeepSpeed's ZeRO or bf16 optimizer holds the parameter's fp32 copy and Adam state in flat
    partitions; otherwise a plain torch optimizer holds them per parameter."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def _link_moments(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds Adam's state, with DeepSpeed's per-parameter views of it
    (what `safe_get/set_full_optimizer_state` read) linked to every param group.

    DeepSpeed's ZeRO-1/2 and bf16 optimizers create those views once, right after their first
    optimizer step; ZeRO-1/2 (0.19.8) does it after stepping the first param group only, so the other
    groups stay unlinked, and a fresh engine (ZeRO-3 included) has no state at all. So: give every flat
    fp32 partition a state (zero moments where it has none, as torch's Adam would) and link again.
    """
    wrapper = optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    partitions = next((getattr(wrapper, name) for name in (
        "single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")  # ZeRO-1/2, bf16, ZeRO-3
        if hasattr(wrapper, name)), [])
    for flat in partitions:
        if flat not in optimizer.state:
            optimizer.state[flat] = {"step": torch.zeros(()), **{key: torch.zeros_like(flat) for key in MOMENTS}}
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    return optimizer


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    skipped = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
               for name in module._non_persistent_buffers_set}
    return [(name, buffer) for name, buffer in model.named_buffers() if name not in skipped]
