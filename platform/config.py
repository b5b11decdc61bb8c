"""The typed job configuration, checked before any Ray worker starts.

Hydra composes plain YAML from `configs/`; `JobConfig.from_dict` turns the resolved tree into these
dataclasses and rejects unknown keys, wrong types and out-of-range values with a `ConfigError` that
names the full key and what it accepts. The YAML files document each key; these classes type them.
"""

import dataclasses
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, fields

from sparta.moe import MoEConfig
from sparta.platform.data import TOKEN_DTYPES, check_corpus
from sparta.platform.lm import FFN_KINDS, LMConfig
from sparta.platform.models import FAMILIES
from sparta.platform.vdit import VDiTConfig
from sparta.platform.video_data import NUM_CLASSES, PROCEDURAL_VIDEO, VideoDataConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}
LR_SCHEDULES = ("warmup_cosine", "warmup_constant")
CLUSTERS = ("local", "ray")
RAY_ADDRESS = re.compile(r"auto|(ray://)?[\w.-]+:\d+")
# MLflow's tracking stores: local files, SQL databases through SQLAlchemy, a tracking server.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class ConfigError(ValueError):
    """A configuration value that cannot run; the message starts with the full key."""


@dataclass(frozen=True)
class DataConfig:
    """A data group sets the keys of its kind; the others keep these defaults and are not used."""
    corpus: str
    # token corpora: python_docs, python_source, your own files
    seq_len: int = 256
    vocab_size: int = 8192
    token_dtype: str = "uint16"
    val_fraction: float = 0.02
    # the procedural video source (corpus: procedural_video)
    frames: int = VideoDataConfig.frames
    height: int = VideoDataConfig.height
    width: int = VideoDataConfig.width
    channels: int = VideoDataConfig.channels
    fps: float = VideoDataConfig.fps
    val_clips: int = VideoDataConfig.val_clips

    @property
    def is_video(self) -> bool:
        return self.corpus == PROCEDURAL_VIDEO

    def video(self, seed: int) -> VideoDataConfig:
        return VideoDataConfig(frames=self.frames, height=self.height, width=self.width, channels=self.channels,
                               fps=self.fps, seed=seed, val_clips=self.val_clips)


@dataclass(frozen=True)
class ParallelConfig:
    data: int | None
    expert: int
    sequence: int

    def data_shards(self, num_workers: int) -> int:
        """Workers that read different samples: sequence-parallel ranks share theirs."""
        return num_workers // self.sequence


@dataclass(frozen=True)
class ChunkSparsityScheduleConfig:
    enabled: bool
    stable_steps: int
    window_steps: int
    max_factor: float
    min_factor: float


@dataclass(frozen=True)
class TrainerConfig:
    num_workers: int | None
    use_gpu: bool | None
    cpus_per_worker: float
    max_steps: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    max_failures: int
    seed: int
    inject_failure_at_step: int | None
    peak_tflops: float | None
    compile: bool
    cuda_graphs: bool
    profile_steps: tuple[int, int] | None
    activation_checkpointing: bool
    init_from: str | None
    chunk_sparsity_schedule: ChunkSparsityScheduleConfig


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class LRScheduleConfig:
    name: str
    warmup_steps: int
    min_lr_ratio: float


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int
    precision: str
    gradient_clipping: float
    gradient_accumulation_steps: int
    micro_batch_size: int
    optimizer: OptimizerConfig
    lr_schedule: LRScheduleConfig


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    address: str | None
    root: str


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None
    experiment: str
    retry_s: float


# model.* are the fields of the config of the family that model.family names (LMConfig, DLMConfig, VDiTConfig);
# the others are set from elsewhere (DERIVED_KEYS): the video DiT's clip size and classes from the data.
DERIVED_KEYS = {"vocab_size": "the tokenizer", "eot_id": "the tokenizer", "moe": "the moe group", "frames": "the data",
                "height": "the data", "width": "the data", "in_channels": "the data", "num_classes": "the data"}
# What VDiTConfig's own checks call the clip size keys that the user sets under data.
VIDEO_SIZE_KEYS = {"model.frames": "data.frames", "model.height": "data.height", "model.width": "data.width",
                   "model.in_channels": "data.channels"}


def model_keys(family: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(FAMILIES[family][0]) if f.name not in DERIVED_KEYS)


MOE_KEYS = tuple(f.name for f in fields(MoEConfig))


@dataclass(frozen=True)
class JobConfig:
    run_name: str | None
    verbose: bool
    model: dict
    moe: dict
    data: DataConfig
    parallel: ParallelConfig
    trainer: TrainerConfig
    deepspeed: DeepSpeedConfig
    cluster: ClusterConfig
    tracking: TrackingConfig

    @classmethod
    def from_dict(cls, tree: dict) -> "JobConfig":
        job = _build(cls, tree, "")
        _check_model(job.model)
        if (job.model["family"] == "vdit") != job.data.is_video:
            expected = PROCEDURAL_VIDEO if job.model["family"] == "vdit" else "a token corpus (python_docs, ...)"
            raise ConfigError(f"data.corpus={job.data.corpus!r}: expected {expected} for "
                              f"model.family={job.model['family']}")
        _check_ranges(job)
        if job.model["ffn"] == "moe":
            _check_moe(job)
        try:
            model = job.model_config(job.data.vocab_size)  # the family's and the data's own checks (model.prompt_prob, ...)
            if job.data.is_video:
                job.data.video(job.trainer.seed)
            else:
                check_corpus(job.data.corpus, job.data.vocab_size, job.data.token_dtype)
        except ValueError as error:
            message = str(error)
            if job.data.is_video:  # the clip size is set under data.*, whatever the model config calls it
                for model_key, data_key in VIDEO_SIZE_KEYS.items():
                    message = message.replace(model_key, data_key)
            raise ConfigError(message) from None
        if job.data.is_video:
            _check_video_split(model, job.parallel.sequence)
        return job

    def moe_config(self) -> MoEConfig | None:
        return MoEConfig(**self.moe) if self.model["ffn"] == "moe" else None

    def model_config(self, vocab_size: int | None = None, eot_id: int | None = None) -> LMConfig | VDiTConfig:
        """The family's config: `model.*` plus what the tokenizer (`vocab_size`, `eot_id`) or the video
        source sets."""
        if self.data.is_video:
            d = self.data
            return VDiTConfig(frames=d.frames, height=d.height, width=d.width, in_channels=d.channels,
                              num_classes=NUM_CLASSES, moe=self.moe_config(), **self.model)
        return FAMILIES[self.model["family"]][0](vocab_size=vocab_size, eot_id=eot_id, moe=self.moe_config(), **self.model)

    def tokens_per_sample(self) -> int:
        """What tokens/s and MFU count: a window's tokens, or a clip's patches."""
        return self.model_config().grid.tokens if self.data.is_video else self.data.seq_len


def _build(cls, tree, path: str):
    """Construct dataclass `cls` from a dict, checking keys and types recursively."""
    where = path or "the top level"
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {_names(cls)}, got {tree!r}")
    allowed = [f.name for f in fields(cls)]
    for key in tree:
        if key not in allowed:
            raise ConfigError(f"{_join(path, key)}: unknown key; allowed keys under {where}: {', '.join(allowed)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in fields(cls):
        if field.name in tree:
            values[field.name] = _convert(hints[field.name], tree[field.name], _join(path, field.name))
        elif field.default is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, field.name)}: missing (expected {_describe(hints[field.name])})")
    return cls(**values)


def _convert(kind, value, key: str):
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [k for k in options if k is not type(None)]
        try:
            return _convert(inner, value, key)
        except ConfigError:
            raise ConfigError(f"{key}={value!r}: expected {_describe(kind)}") from None
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(items)} numbers")
        return tuple(_convert(k, v, f"{key}[{i}]") for i, (k, v) in enumerate(zip(items, value)))
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    # bool is an int in Python: reject it where a number is expected, and numbers where a bool is.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {_describe(kind)}")
    return float(value) if kind is float else value


def _check_model(model: dict) -> None:
    family = model.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r}: expected one of {', '.join(FAMILIES)}")
    keys = model_keys(family)
    for key in model:
        if key not in keys:
            hint = f" (it is set by {DERIVED_KEYS[key]})" if key in DERIVED_KEYS else ""
            raise ConfigError(f"model.{key}: unknown key{hint}; allowed keys under model with model.family={family}: "
                              f"{', '.join(keys)}")
    hints = typing.get_type_hints(FAMILIES[family][0])
    for key in keys:
        if key not in model:
            raise ConfigError(f"model.{key}: missing (expected {_describe(hints[key])})")
        model[key] = _convert(hints[key], model[key], f"model.{key}")


def _check_moe(job: JobConfig) -> None:
    """The `moe` group maps onto MoEConfig: unknown keys, then MoEConfig's own checks, then the layout."""
    for key in job.moe:
        if key not in MOE_KEYS:
            raise ConfigError(f"moe.{key}: unknown key; allowed keys under moe: {', '.join(MOE_KEYS)}")
    try:
        moe = job.moe_config()
    except (TypeError, ValueError) as error:  # MoEConfig names the field as "MoEConfig.<field>"
        raise ConfigError(str(error).replace("MoEConfig.", "moe.")) from None
    m, ep = job.model, job.parallel.expert
    if m["first_dense_layers"] >= m["n_layers"]:  # the first MoE block is block first_dense_layers
        raise ConfigError(f"model.first_dense_layers={m['first_dense_layers']}: expected < model.n_layers={m['n_layers']} "
                          "so that model.ffn=moe has an MoE layer")
    if moe.num_experts % ep:
        raise ConfigError(f"parallel.expert={ep}: expected a divisor of moe.num_experts={moe.num_experts}")
    if job.trainer.cuda_graphs and (moe.router == "blockffn" or ep > 1):
        raise ConfigError("trainer.cuda_graphs=true: expected a model with fixed shapes; "
                          + ("moe.router=blockffn sizes its expert rows from the data" if moe.router == "blockffn"
                             else f"parallel.expert={ep} exchanges rows in data-sized all-to-alls"))
    if moe.router == "blockffn" and job.trainer.chunk_sparsity_schedule.enabled and moe.chunk_sparsity_coef <= 0:
        raise ConfigError(f"moe.chunk_sparsity_coef={moe.chunk_sparsity_coef}: expected > 0 while "
                          "trainer.chunk_sparsity_schedule.enabled=true (the schedule scales it)")


def _check_ranges(job: JobConfig) -> None:
    m, d, t, ds = job.model, job.data, job.trainer, job.deepspeed
    ep, sp = job.parallel.expert, job.parallel.sequence
    checks = [
        (m["ffn"] in FFN_KINDS, "model.ffn", f"one of {', '.join(FFN_KINDS)}", m["ffn"]),
        (m["moe_every"] >= 1, "model.moe_every", ">= 1", m["moe_every"]),
        (m["first_dense_layers"] >= 0, "model.first_dense_layers", ">= 0", m["first_dense_layers"]),
        (job.parallel.data is None or job.parallel.data >= 1, "parallel.data", ">= 1 or null", job.parallel.data),
        (ep >= 1, "parallel.expert", ">= 1", ep),
        (ep == 1 or m["ffn"] == "moe", "parallel.expert", "1 for model.ffn=dense (no experts to shard)", ep),
        (sp >= 1, "parallel.sequence", ">= 1", sp),
        *([] if d.is_video else _token_model_checks(m, d, sp)),
        (t.num_workers is None or t.num_workers >= 1, "trainer.num_workers", ">= 1 or null (one per GPU, else 2)", t.num_workers),
        (t.cpus_per_worker > 0, "trainer.cpus_per_worker", "> 0 (a fraction shares a CPU)", t.cpus_per_worker),
        *[(getattr(t, k) >= 1, f"trainer.{k}", ">= 1", getattr(t, k))
          for k in ("max_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints")],
        (t.max_failures >= -1, "trainer.max_failures", ">= 0, or -1 for unlimited", t.max_failures),
        (t.inject_failure_at_step is None or 1 <= t.inject_failure_at_step <= t.max_steps,
         "trainer.inject_failure_at_step", f"null or in 1..trainer.max_steps={t.max_steps}", t.inject_failure_at_step),
        (t.peak_tflops is None or t.peak_tflops > 0, "trainer.peak_tflops", "> 0 or null", t.peak_tflops),
        (not t.cuda_graphs or t.compile, "trainer.cuda_graphs", "false unless trainer.compile=true (the graphs are Inductor's)",
         t.cuda_graphs),
        # ZeRO-2 copies each gradient out of the graph's memory as the backward makes it. ZeRO-0/1 leave it in
        # param.grad, which the next micro-batch's replay overwrites (H100: the second backward fails); ZeRO-3
        # moves the parameters a graph reads.
        (not t.cuda_graphs or ds.zero_stage == 2, "trainer.cuda_graphs",
         f"false with deepspeed.zero_stage={ds.zero_stage} (the graphs need ZeRO-2)", t.cuda_graphs),
        (t.profile_steps is None or 1 <= t.profile_steps[0] <= t.profile_steps[1] <= t.max_steps, "trainer.profile_steps",
         f"null or [first, last] with 1 <= first <= last <= trainer.max_steps={t.max_steps}", t.profile_steps),
        *[(ok, f"trainer.chunk_sparsity_schedule.{key}", expected, getattr(t.chunk_sparsity_schedule, key))
          for ok, key, expected in (
              (t.chunk_sparsity_schedule.window_steps >= 1, "window_steps", ">= 1"),
              (t.chunk_sparsity_schedule.stable_steps > t.chunk_sparsity_schedule.window_steps, "stable_steps",
               f"> trainer.chunk_sparsity_schedule.window_steps={t.chunk_sparsity_schedule.window_steps}"),
              (t.chunk_sparsity_schedule.max_factor >= 1, "max_factor", ">= 1"),
              (t.chunk_sparsity_schedule.min_factor >= 1, "min_factor", ">= 1"))],
        (ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "one of 0, 1, 2, 3", ds.zero_stage),
        (ds.precision in PRECISIONS, "deepspeed.precision", f"one of {', '.join(PRECISIONS)}", ds.precision),
        (ds.gradient_clipping >= 0, "deepspeed.gradient_clipping", ">= 0 (0 disables clipping)", ds.gradient_clipping),
        (ds.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps", ">= 1", ds.gradient_accumulation_steps),
        (ds.micro_batch_size >= 1, "deepspeed.micro_batch_size", ">= 1", ds.micro_batch_size),
        (ds.optimizer.name in OPTIMIZERS, "deepspeed.optimizer.name", f"one of {', '.join(OPTIMIZERS)}", ds.optimizer.name),
        (ds.optimizer.lr > 0, "deepspeed.optimizer.lr", "> 0", ds.optimizer.lr),
        (all(0 <= b < 1 for b in ds.optimizer.betas), "deepspeed.optimizer.betas", "two numbers in [0, 1)",
         list(ds.optimizer.betas)),
        (ds.optimizer.eps > 0, "deepspeed.optimizer.eps", "> 0", ds.optimizer.eps),
        (ds.optimizer.weight_decay >= 0, "deepspeed.optimizer.weight_decay", ">= 0", ds.optimizer.weight_decay),
        (ds.lr_schedule.name in LR_SCHEDULES, "deepspeed.lr_schedule.name", f"one of {', '.join(LR_SCHEDULES)}",
         ds.lr_schedule.name),
        (0 <= ds.lr_schedule.warmup_steps <= t.max_steps, "deepspeed.lr_schedule.warmup_steps",
         f"in 0..trainer.max_steps={t.max_steps}", ds.lr_schedule.warmup_steps),
        (0 <= ds.lr_schedule.min_lr_ratio <= 1, "deepspeed.lr_schedule.min_lr_ratio", "in [0, 1]", ds.lr_schedule.min_lr_ratio),
        (job.cluster.name in CLUSTERS, "cluster.name", f"one of {', '.join(CLUSTERS)}", job.cluster.name),
        (job.cluster.address is None or RAY_ADDRESS.fullmatch(job.cluster.address) is not None, "cluster.address",
         "null (a local Ray instance), auto, or host:port / ray://host:port", job.cluster.address),
        (job.tracking.uri is None or _tracking_uri_ok(job.tracking.uri), "tracking.uri",
         f"null, a path, or a URI of scheme {', '.join(TRACKING_SCHEMES)} with a host or path", job.tracking.uri),
        (bool(job.tracking.experiment), "tracking.experiment", "a non-empty name", job.tracking.experiment),
        (job.tracking.retry_s > 0, "tracking.retry_s", "a positive number of seconds", job.tracking.retry_s),
    ]
    for ok, key, expected, got in checks:
        if not ok:
            raise ConfigError(f"{key}={got!r}: expected {expected}")


def _token_model_checks(m: dict, d: DataConfig, sp: int) -> list[tuple]:
    """`_check_ranges`' checks of the language-model families and their token windows."""
    return [
        *[(m[k] > 0, f"model.{k}", "> 0", m[k]) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")],
        (m["d_model"] % m["n_heads"] == 0 and (m["d_model"] // m["n_heads"]) % 2 == 0, "model.n_heads",
         f"a divisor of model.d_model={m['d_model']} leaving an even head dim", m["n_heads"]),
        (m["n_heads"] % m["n_kv_heads"] == 0, "model.n_kv_heads", f"a divisor of model.n_heads={m['n_heads']}", m["n_kv_heads"]),
        (0 < d.seq_len <= m["max_seq_len"], "data.seq_len", f"in 1..model.max_seq_len={m['max_seq_len']}", d.seq_len),
        (0 < d.val_fraction <= 0.5, "data.val_fraction", "in (0, 0.5]", d.val_fraction),
        (d.token_dtype in TOKEN_DTYPES, "data.token_dtype", f"one of {', '.join(TOKEN_DTYPES)}", d.token_dtype),
        *[(sp == 1 or m[k] % sp == 0, "parallel.sequence", f"a divisor of model.{k}={m[k]} (each rank attends with "
           "its share of the heads)", sp) for k in ("n_heads", "n_kv_heads")],
        (sp == 1 or d.seq_len % sp == 0, "parallel.sequence", f"a divisor of data.seq_len={d.seq_len} (each rank "
         "holds an equal shard of the sequence)", sp),
    ]


def _check_video_split(cfg: VDiTConfig, sp: int) -> None:
    """A sequence-parallel rank holds an equal share of a clip's tokens and attends with its share of the heads."""
    if cfg.grid.tokens % sp or cfg.n_heads % sp:
        raise ConfigError(f"parallel.sequence={sp}: expected a divisor of model.n_heads={cfg.n_heads} and of the "
                          f"{cfg.grid.tokens} tokens of a clip (the grid {cfg.grid.frames} x {cfg.grid.height} x "
                          f"{cfg.grid.width} of data.frames/height/width over model.patch)")


def _tracking_uri_ok(uri: str) -> bool:
    """A path (MLflow's file store), or a URI whose scheme MLflow can store runs at, with somewhere to go."""
    parsed = urllib.parse.urlparse(uri)
    if not parsed.scheme:
        return bool(uri.strip())
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2://...
    return scheme in TRACKING_SCHEMES and bool(parsed.netloc or parsed.path.strip("/") or scheme == "databricks")


def deepspeed_config(ds: DeepSpeedConfig, max_steps: int, use_gpu: bool, world_size: int) -> dict:
    """The dict given to `deepspeed.initialize` on `world_size` workers: our documented keys mapped onto DeepSpeed's."""
    precision = ds.precision if ds.precision != "auto" else ("bf16" if use_gpu else "fp32")
    if precision != "fp32" and not use_gpu:
        raise ConfigError(f"deepspeed.precision={ds.precision!r}: CPU workers train in fp32; use auto or fp32")
    opt, sched = ds.optimizer, ds.lr_schedule
    if sched.name == "warmup_cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max_steps, "warmup_num_steps": sched.warmup_steps, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": sched.min_lr_ratio}}
    else:
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": opt.lr, "warmup_num_steps": sched.warmup_steps,
            "warmup_type": "linear"}}
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        # One worker has nothing to scatter, yet ZeRO-1/2's reduce-scatter path divides every micro-batch's
        # gradients by 1 and copies them once more (the divide alone: 0.6 ms a micro-batch of the 0.48B MoE
        # LM on an H100).
        "zero_optimization": {"stage": ds.zero_stage, "reduce_scatter": world_size > 1},
        # No per-tensor overflow check in bf16 (no loss scale to adjust): it cost ~15 ms of host time and a
        # host sync a step (0.48B MoE LM, H100). As in Megatron, the loop stops the run on a non-finite
        # gradient norm instead (worker.divergence).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16"},
        # torch_adam: use torch's Adam(W) instead of compiling DeepSpeed's fused CUDA/CPU op; on a GPU its
        # fused kernel, one pass over the states (the multi-tensor one makes ~7: 14.5 ms a step for the 0.48B
        # MoE LM on an H100, against 20 ms for its backward).
        "optimizer": {"type": OPTIMIZERS[opt.name], "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
            "torch_adam": True, **({"fused": True} if use_gpu else {})}},
        "scheduler": scheduler,
        "steps_per_print": 2**31 - 1,  # sparta prints its own progress
    }


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _names(cls) -> str:
    return ", ".join(f.name for f in fields(cls))


def _describe(kind) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} numbers"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", dict: "a mapping"}.get(kind, getattr(kind, "__name__", str(kind)))
