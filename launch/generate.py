"""Sample from a trained masked diffusion LM (model.family=dlm) with dense or SparseD attention, or
videos from a trained video DiT (model.family=vdit) with dense attention and a searched Sparse-vDiT plan.

    python launch/generate.py RUN [key=value ...]     # RUN: MLflow run id, sparta run name, checkpoint or export dir
    python launch/generate.py dlm prompt="def fibonacci(n):" gen_len=64 block_len=32 steps=64
    python launch/generate.py dlm prompt_tokens=16000 gen_len=128 attention=sparsed sparsed.keep_ratio=0.3
    python launch/generate.py vdit samples=4 steps=20 cfg_scale=2.0      # after: python launch/search.py vdit

dLM keys: the prompt, from exactly one of prompt (text), prompt_file (a text file) or prompt_tokens (that
many tokens of the run's validation split: fills a long context); samples (rows sampled together:
the text prompt repeated, or consecutive validation windows); compare (attention=sparsed: also
sample densely from the same seed and report the agreement); and the sampler's (platform/dlm.py,
SamplerConfig): gen_len, steps, block_len, temperature, seed, attention (dense | sparsed), backend
(auto | triton | reference), sparsed.skip_ratio, sparsed.keep_ratio, sparsed.block.

Runs on one device (a GPU if there is one, in bf16; dense attention through cuDNN's SDPA first).
Logs to the run, at the checkpoint's step: generate/<attention>/tokens_per_s, .../wall_s and
.../mean_step_ms; .../step_ms at each denoising step 1..T; generate/sparsed/block_fraction (the
attention blocks computed, over all steps and layers), generate/sparsed/agreement and .../speedup
(against the dense run); the samples as generate/samples-<attention>.txt. A progress bar follows
the denoising steps.

Video DiT keys: samples (clips, default 2, or as many as labels), labels (class ids, default 0 ..
samples - 1 mod model.num_classes), steps (20 Euler steps), cfg_scale (1.0: no guidance), seed (0:
the noise, the same for both attention kinds), attention (dense | plan | both; default both when a
plan is found, else dense), plan (a plan YAML; default the run's search/plan.yaml artifact, else
<checkpoint>/search/plan.yaml, as launch/search.py writes them, else the model.plan the run trained
with), backend (auto: triton on a GPU, reference on the CPU), fps (the run's data.fps), formats
([gif, mp4]), compile (false: torch.compile the blocks for both kinds), out (default
<checkpoint>/generate). Writes each clip as out/video-<attention>-<i>.gif
and .mp4 and logs them to the run under generate/, with the metrics generate/video/<attention>/wall_s
(end-to-end sampling), generate/video/attention_share (of one dense denoising step's time, against
the step with every attention output zeroed) and, with both kinds, generate/video/plan/speedup (dense
wall over plan wall), generate/video/plan/psnr and .../ssim (the plan's clips against the dense
ones). A progress bar follows the denoising steps.

Exit code 2: bad input, refused before any sampling.
"""

import contextlib
import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from sparta.attention import Plan
from sparta.kernels.block_sparse_attention import SUPPORTED_HEAD_DIMS
from sparta.platform import vdit
from sparta.platform.data import TOKENIZER_FILE, load_tokenizer, open_corpus
from sparta.platform.dlm import BACKENDS, SamplerConfig, check_sampler, generate, sparsed_schedule, use_attention
from sparta.platform.models import config_from_dict
from sparta.platform.runs import cli, load_model, read_config, resolve_cli
from sparta.platform.tracking import Tracker

PLAN_ARTIFACT = "search/plan.yaml"  # launch/search.py's, in the run and under the checkpoint
VIDEO_ATTENTION = ("dense", "plan", "both")


@dataclass
class GenerateConfig(SamplerConfig):
    prompt: str = ""                  # text to continue
    prompt_file: str | None = None    # or a text file to continue
    prompt_tokens: int = 0            # or this many tokens of the run's validation split
    samples: int = 1                  # rows sampled together
    compare: bool = True              # attention=sparsed: also sample densely, same seed, and compare


@dataclass
class Generation:
    tokens: torch.Tensor              # [samples, gen_len]
    step_seconds: list[float]
    block_fraction: float             # attention blocks computed, mean over steps and layers (1: dense)

    @property
    def wall_s(self) -> float:
        return sum(self.step_seconds)


def parse_config(overrides: list[str], schema: type = GenerateConfig):
    """key=value overrides onto the defaults of `schema`; `prompt` is taken verbatim (code is not YAML)."""
    config = OmegaConf.structured(schema)
    try:
        for override in overrides:
            key, equals, value = override.partition("=")
            if not equals:
                raise ValueError(f"{override!r}: expected key=value")
            if key == "prompt":
                config.prompt = value
            else:
                config = OmegaConf.merge(config, OmegaConf.from_dotlist([override]))
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ValueError(f"{error.full_key}: {str(error).splitlines()[0]}") from None


def build_prompt(cfg: GenerateConfig, model_dir: Path, run_config: dict) -> tuple[torch.Tensor, object]:
    """The prompt ids `[samples, prompt_len]` and the tokenizer."""
    given = [key for key, value in (("prompt", cfg.prompt), ("prompt_file", cfg.prompt_file),
                                    ("prompt_tokens", cfg.prompt_tokens)) if value]
    if len(given) > 1:
        raise ValueError(f"{given[1]}: give one of prompt, prompt_file, prompt_tokens (got {', '.join(given)})")
    if cfg.samples < 1 or cfg.prompt_tokens < 0:
        key = "samples" if cfg.samples < 1 else "prompt_tokens"
        raise ValueError(f"{key}={getattr(cfg, key)!r}: expected {'>= 1' if key == 'samples' else '>= 0'}")
    exported = Path(model_dir) / TOKENIZER_FILE
    tokenizer = load_tokenizer(exported if exported.is_file() else Path(run_config["corpus_dir"]) / TOKENIZER_FILE)
    if cfg.prompt_tokens:
        val = open_corpus(Path(run_config["corpus_dir"])).val
        if len(val) < cfg.samples * cfg.prompt_tokens:
            raise ValueError(f"prompt_tokens={cfg.prompt_tokens}: the validation split has {len(val)} tokens, too few "
                             f"for samples={cfg.samples} prompts of that length")
        ids = torch.from_numpy(val[:cfg.samples * cfg.prompt_tokens].astype("int64")).view(cfg.samples, -1)
        return ids, tokenizer
    if cfg.prompt_file:
        try:
            text = Path(cfg.prompt_file).read_text()
        except OSError as error:
            raise ValueError(f"prompt_file={cfg.prompt_file!r}: cannot read it ({error.strerror})") from None
    else:
        text = cfg.prompt
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)
    return ids.expand(cfg.samples, -1), tokenizer


class CountedBlocks:
    """Layout provider around a SparseDSchedule that adds up the share of attention blocks each
    layer's call computes (1 for a dense call), on the device."""

    def __init__(self, schedule):
        self.schedule, self.total, self.calls = schedule, 0.0, 0

    def __call__(self, q, k, layer):
        groups = self.schedule(q, k, layer)
        self.total = self.total + (1.0 if groups is None else groups[0].layout.density().mean())
        self.calls += 1
        return groups

    @property
    def fraction(self) -> float:
        return float(self.total) / max(self.calls, 1)


class StepClock:
    """`generate`'s on_step: waits for the device, records the step's wall time, moves the progress bar."""

    def __init__(self, device: torch.device, bar: tqdm):
        self.device, self.bar, self.seconds = device, bar, []
        self.last = time.perf_counter()

    def __call__(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now
        self.bar.update()


def dense_sdpa_first(device: torch.device):
    """On GPUs, SDPA tries cuDNN's attention first (the fastest dense baseline on H100)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def sample(model, prompt: torch.Tensor, sampler: SamplerConfig, attention: str, backend: str) -> Generation:
    """One timed `generate` run with `attention` (dense | sparsed), after an untimed warm-up call of
    each kind it will make (cuDNN plans, Triton compilation)."""
    device = prompt.device
    x = torch.cat([prompt, prompt.new_full((prompt.shape[0], sampler.gen_len), model.mask_id)], dim=1)
    with dense_sdpa_first(device), torch.no_grad():
        use_attention(model, None, backend)
        model.logits(x, prompt.shape[1])
        schedule = counted = None
        if attention == "sparsed":
            warm = sparsed_schedule(sampler, prompt.shape[1])
            warm.step = warm.num_steps - 1  # past the switch: select the masks and run the kernel
            use_attention(model, warm, backend)
            model.logits(x, prompt.shape[1])
            schedule = sparsed_schedule(sampler, prompt.shape[1])
            counted = CountedBlocks(schedule)
            use_attention(model, counted, backend)
        with tqdm(total=sampler.steps, desc=f"denoising ({attention})", unit="step", file=sys.stderr) as bar:
            clock = StepClock(device, bar)
            tokens = generate(model, prompt, sampler, schedule, clock)
    use_attention(model, None, backend)
    return Generation(tokens.cpu(), clock.seconds, counted.fraction if counted else 1.0)


def report(runs: dict[str, Generation]) -> dict[str, float]:
    metrics = {}
    for attention, run in runs.items():
        tokens = run.tokens.numel()
        metrics |= {f"generate/{attention}/tokens_per_s": tokens / run.wall_s, f"generate/{attention}/wall_s": run.wall_s,
                    f"generate/{attention}/mean_step_ms": 1000 * run.wall_s / len(run.step_seconds)}
    if "sparsed" in runs:
        metrics["generate/sparsed/block_fraction"] = runs["sparsed"].block_fraction
    if len(runs) == 2:
        metrics["generate/sparsed/agreement"] = (runs["sparsed"].tokens == runs["dense"].tokens).float().mean().item()
        metrics["generate/sparsed/speedup"] = runs["dense"].wall_s / runs["sparsed"].wall_s
    return metrics


def samples_text(prompt: torch.Tensor, tokens: torch.Tensor, tokenizer, tail_tokens: int = 200) -> str:
    parts = []
    for row, (context, answer) in enumerate(zip(prompt.tolist(), tokens.tolist())):
        shown = context[-tail_tokens:]
        cut = f"[... {len(context) - len(shown)} prompt tokens]" if len(shown) < len(context) else ""
        parts.append(f"=== sample {row}: prompt ===\n{cut}{tokenizer.decode(shown)}\n"
                     f"=== sample {row}: answer ===\n{tokenizer.decode(answer)}\n")
    return "\n".join(parts)


# ---- video DiT runs (model.family=vdit) ---------------------------------------------------------------


@dataclass
class VideoConfig:
    samples: int | None = None        # clips; None: as many as labels, else 2
    labels: list[int] | None = None   # a class id per clip; None: 0 .. samples - 1 mod model.num_classes
    steps: int = 20                   # Euler steps from noise to video
    cfg_scale: float = 1.0            # classifier-free guidance (1: none)
    seed: int = 0                     # the noise, shared by both attention kinds
    attention: str | None = None      # dense | plan | both; None: both with a plan, else dense
    plan: str | None = None           # plan YAML; None: the run's search/plan.yaml, <checkpoint>/search/plan.yaml
                                      # or the model.plan the run trained with, the first found
    backend: str = "auto"             # what runs the plan: auto | triton | reference
    fps: float | None = None          # of the written videos; None: the run's data.fps
    formats: list[str] = field(default_factory=lambda: ["gif", "mp4"])  # the files written of each clip
    compile: bool = False             # torch.compile the blocks (both kinds; compiled in the untimed warm-up)
    out: str | None = None            # None: <checkpoint>/generate


def check_video(cfg: VideoConfig, model_cfg, run_fps: float, device: torch.device) -> str:
    """Refuse settings the model cannot run, naming the key; fills in samples, labels and fps and returns
    the backend that runs the plan."""
    if model_cfg.plan and not Path(model_cfg.plan).is_file():
        raise ValueError(f"model.plan={model_cfg.plan}: the plan this run trained with is not on this machine; copy "
                         "it to that path (the model is built with it)")
    cfg.fps = run_fps if cfg.fps is None else cfg.fps
    if cfg.samples is None:
        cfg.samples = len(cfg.labels) if cfg.labels else 2
    if cfg.labels is None:
        cfg.labels = [index % model_cfg.num_classes for index in range(cfg.samples)]
    backend = ("triton" if device.type == "cuda" else "reference") if cfg.backend == "auto" else cfg.backend
    head_dim = model_cfg.d_model // model_cfg.n_heads
    checks = [
        (cfg.samples >= 1, "samples", ">= 1", cfg.samples),
        (len(cfg.labels) == cfg.samples, "labels", f"one class id per clip (samples={cfg.samples})", cfg.labels),
        (all(0 <= label < model_cfg.num_classes for label in cfg.labels), "labels",
         f"class ids in [0, {model_cfg.num_classes}) (model.num_classes)", cfg.labels),
        (cfg.steps >= 1, "steps", ">= 1", cfg.steps),
        (cfg.fps > 0, "fps", "> 0", cfg.fps),
        (bool(cfg.formats) and set(cfg.formats) <= {"gif", "mp4"}, "formats", "a list of gif and mp4", cfg.formats),
        ("mp4" not in cfg.formats or importlib.util.find_spec("imageio_ffmpeg") is not None, "formats",
         "gif only where the imageio-ffmpeg package (the train extra's) is not installed", cfg.formats),
        (cfg.attention in (None, *VIDEO_ATTENTION), "attention", f"one of {', '.join(VIDEO_ATTENTION)}", cfg.attention),
        (cfg.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}", cfg.backend),
        (model_cfg.in_channels in (1, 3), "model.in_channels", "1 (grey) or 3 (RGB) to write videos",
         model_cfg.in_channels),
    ]
    if backend == "triton" and cfg.attention != "dense":
        checks += [
            (device.type == "cuda", "backend", "reference on a machine without a GPU (the Triton kernels run on CUDA)",
             cfg.backend),
            (head_dim in SUPPORTED_HEAD_DIMS, "backend", f"reference: the Triton kernels take head dims "
             f"{SUPPORTED_HEAD_DIMS}, this model's is {head_dim} (model.d_model / model.n_heads)", cfg.backend),
        ]
    for ok, key, expected, value in checks:
        if not ok:
            raise ValueError(f"{key}={value!r}: expected {expected}")
    return backend


def find_plan(cfg: VideoConfig, model_dir: Path, run_id: str | None, uri: str,
              model_plan: str | None) -> tuple[Plan | None, str]:
    """(the plan, where it came from): plan=..., else the run's search/plan.yaml artifact, else the one
    launch/search.py wrote under the checkpoint, else the run's model.plan; (None, "") if there is none."""
    with tempfile.TemporaryDirectory() as scratch:
        if cfg.plan:
            path, source = Path(cfg.plan), f"plan={cfg.plan}"
            if not path.is_file():
                raise ValueError(f"{source}: no such file")
        else:
            path, source = model_dir / PLAN_ARTIFACT, f"plan ({model_dir / PLAN_ARTIFACT})"
            if run_id:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                if any(artifact.path == PLAN_ARTIFACT for artifact in client.list_artifacts(run_id, "search")):
                    path = Path(client.download_artifacts(run_id, PLAN_ARTIFACT, scratch))
                    source = f"plan (the {PLAN_ARTIFACT} artifact of run {run_id})"
            if not path.is_file() and model_plan:
                path, source = Path(model_plan), f"model.plan={model_plan} (the plan the run trained with)"
            if not path.is_file():
                return None, ""
        try:
            return Plan.load(path), source
        except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as error:
            raise ValueError(f"{source}: not a plan launch/search.py writes ({error})") from None


def video_kinds(cfg: VideoConfig, plan: Plan | None) -> list[str]:
    """The attention kinds to sample with, in order (dense first: the plan's reference)."""
    attention = cfg.attention or ("both" if plan is not None else "dense")
    if attention != "dense" and plan is None:
        raise ValueError(f"attention={attention}: no plan found; give plan=PATH or run launch/search.py on the run "
                         f"first (looked for its {PLAN_ARTIFACT} artifact and <checkpoint>/{PLAN_ARTIFACT})")
    return {"dense": ["dense"], "plan": ["plan"], "both": ["dense", "plan"]}[attention]


def sample_videos(model, noise: torch.Tensor, labels: torch.Tensor, cfg: VideoConfig, kind: str, provider,
                  backend: str) -> tuple[torch.Tensor, float]:
    """(clips [B, C, T, H, W] in [-1, 1] on the CPU, wall seconds): one timed `vdit.sample` with attention
    `provider` (None: dense SDPA), after an untimed one-step warm-up (cuDNN plans, Triton compilation)."""
    with dense_sdpa_first(noise.device), torch.no_grad():
        use_attention(model, provider, backend)
        vdit.sample(model, noise, labels, 1, cfg.cfg_scale)
        with tqdm(total=cfg.steps, desc=f"denoising ({kind})", unit="step", file=sys.stderr) as bar:
            clock = StepClock(noise.device, bar)
            videos = vdit.sample(model, noise, labels, cfg.steps, cfg.cfg_scale, on_step=clock)
    use_attention(model, None, backend)
    return videos.clamp(-1, 1).cpu(), sum(clock.seconds)


def compile_blocks(model) -> None:
    """torch.compile every block: the work around the attention (norms, modulation, rotary, SwiGLU) fuses.
    The blocks share their code, compiled once per layer and attention provider (layer indices and
    layouts are constants of the graphs), so the recompile limit is raised to hold them all."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(model.blocks))
    for block in model.blocks:
        block.compile()


def attention_share(model, noise: torch.Tensor, labels: torch.Tensor, cfg_scale: float, backend: str,
                    repeats: int = 5) -> float:
    """The share of a dense denoising step's time spent in attention: the step as it is against the same
    step with every head's output zeroed (an empty head-group list: no attention). Each is the fastest
    of `repeats` calls: what other work on the machine adds is never negative."""
    def step_s(provider) -> float:
        use_attention(model, provider, backend)
        vdit.sample(model, noise, labels, 1, cfg_scale)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            vdit.sample(model, noise, labels, 1, cfg_scale)
            if noise.device.type == "cuda":
                torch.cuda.synchronize(noise.device)
            seconds.append(time.perf_counter() - start)
        return min(seconds)

    with dense_sdpa_first(noise.device), torch.no_grad():
        dense, no_attention = step_s(None), step_s(lambda q, k, layer: [])
    use_attention(model, None, backend)
    return (dense - no_attention) / dense


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio (dB) of y against x over all their pixels, for values in a range of
    `data_range` (2: videos in [-1, 1]); inf where they are equal."""
    mse = (x.double() - y.double()).square().mean()
    return float(10 * torch.log10(data_range**2 / mse))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al., 2004) of videos [B, C, T, H, W]: the SSIM map of each
    frame and channel under a Gaussian window (11 pixels, sigma 1.5; valid positions only) with
    K1 = 0.01, K2 = 0.03, averaged over positions, frames, channels and clips. Frames smaller than the
    window take the largest odd window that fits."""
    size = min(window, *x.shape[-2:])
    size -= 1 - size % 2
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    gauss = torch.exp(-offsets.square() / (2 * sigma**2))
    gauss /= gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).to(x.device)[None, None]

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel)

    a, b = (v.double().reshape(-1, 1, *v.shape[-2:]) for v in (x, y))  # every frame of every channel
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a.square(), blur(b * b) - mu_b.square(), blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def write_videos(videos: torch.Tensor, kind: str, out: Path, fps: float, formats: list[str]) -> list[Path]:
    """Each clip [C, T, H, W] in [-1, 1] as out/video-<kind>-<i>.gif and/or .mp4 (H.264); the files."""
    import imageio.v3 as iio  # only video runs need imageio (the train extra's)

    frames = ((videos + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]
    frames = frames.expand(*frames.shape[:-1], 3) if frames.shape[-1] == 1 else frames
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for index, clip in enumerate(frames.contiguous().numpy()):
        if "gif" in formats:
            files.append(out / f"video-{kind}-{index}.gif")
            iio.imwrite(files[-1], clip, plugin="pillow", duration=1000 / fps, loop=0)
        if "mp4" in formats:
            files.append(out / f"video-{kind}-{index}.mp4")
            # macro_block_size 2: H.264's 4:2:0 needs even sizes; imageio's default 16 would resize the frames
            iio.imwrite(files[-1], clip, plugin="FFMPEG", fps=fps, macro_block_size=2)
    return files


def log_videos(uri: str, run_id: str, metrics: dict[str, float], files: list[Path], step: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    for file in files:
        client.log_artifact(run_id, str(file), "generate")


def generate_videos(args, model_dir: Path, run_id: str | None, uri: str, run_config: dict) -> None:
    """launch/generate.py for a model.family=vdit run (module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    uri = run_config.get("tracking_uri") or uri
    try:
        cfg = parse_config(args.overrides, VideoConfig)
        model_cfg = config_from_dict(run_config["model_config"])
        backend = check_video(cfg, model_cfg, run_config["video_data"]["fps"], device)
        plan, source = (find_plan(cfg, model_dir, run_id, uri, model_cfg.plan) if cfg.attention != "dense"
                        else (None, ""))
        if plan is not None:
            vdit.check_plan(plan, model_cfg, source)
        kinds = video_kinds(cfg, plan)
    except ValueError as error:
        print(f"generate: {error}", file=sys.stderr)
        sys.exit(2)

    model, _ = load_model(model_dir)
    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    if cfg.compile:
        compile_blocks(model)
    shape = (cfg.samples, model_cfg.in_channels, model_cfg.frames, model_cfg.height, model_cfg.width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    labels = torch.tensor(cfg.labels, device=device)
    out = Path(cfg.out) if cfg.out else model_dir / "generate"
    videos, metrics, files = {}, {}, []
    for kind in kinds:
        videos[kind], metrics[f"generate/video/{kind}/wall_s"] = sample_videos(
            model, noise, labels, cfg, kind, plan if kind == "plan" else None, backend)
        files += write_videos(videos[kind], kind, out, cfg.fps, cfg.formats)
    metrics["generate/video/attention_share"] = attention_share(model, noise, labels, cfg.cfg_scale, backend)
    if len(kinds) == 2:
        metrics["generate/video/plan/speedup"] = metrics["generate/video/dense/wall_s"] / metrics["generate/video/plan/wall_s"]
        metrics["generate/video/plan/psnr"] = psnr(videos["dense"], videos["plan"])
        metrics["generate/video/plan/ssim"] = ssim(videos["dense"], videos["plan"])
    print(f"[sparta] {len(files)} videos in {out}" + (f"; {source}" if plan is not None else ""))
    for key, value in metrics.items():
        print(f"[sparta] {key} {value:.4g}")
    if run_id:
        log_videos(uri, run_id, metrics, files, run_config.get("step", 0))
        print(f"[sparta] logged generate/video/* and the videos under generate/ to MLflow run {run_id}")


def main(argv: list[str] | None = None) -> None:
    parser = cli(__doc__, "MLflow run id, sparta run name, checkpoint or export directory of a model.family=dlm or "
                          "model.family=vdit run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings (see above)")
    args = parser.parse_intermixed_args(argv)
    model_dir, run_id, uri = resolve_cli(args, "generate")
    run_config = read_config(model_dir)
    if run_config["model_config"].get("family") == "vdit":
        generate_videos(args, model_dir, run_id, uri, run_config)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = parse_config(args.overrides)
        family = run_config["model_config"].get("family", "lm")
        if family != "dlm":
            raise ValueError(f"{args.run}: a checkpoint of model.family={family}; launch/generate.py samples "
                             "model.family=dlm runs (masked diffusion LMs) and model.family=vdit runs (video DiTs)")
        prompt, tokenizer = build_prompt(cfg, model_dir, run_config)
        backend = check_sampler(cfg, config_from_dict(run_config["model_config"]), prompt.shape[1], device)
    except ValueError as error:
        print(f"generate: {error}", file=sys.stderr)
        sys.exit(2)

    model, _ = load_model(model_dir)
    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    prompt = prompt.to(device)
    kinds = ["dense", "sparsed"] if cfg.attention == "sparsed" and cfg.compare else [cfg.attention]
    runs = {attention: sample(model, prompt, cfg, attention, backend) for attention in kinds}
    metrics = report(runs)
    text = samples_text(prompt.cpu(), runs[cfg.attention].tokens, tokenizer)
    print(text)
    for key, value in metrics.items():
        print(f"[sparta] {key} {value:.4g}")
    if run_id:
        tracker = Tracker(run_config.get("tracking_uri") or uri, run_id)
        tracker.log_metrics(metrics, run_config.get("step", 0))
        for attention, run in runs.items():
            for step, seconds in enumerate(run.step_seconds, 1):
                tracker.log_metrics({f"generate/{attention}/step_ms": 1000 * seconds}, step)
            tracker.log_text(samples_text(prompt.cpu(), run.tokens, tokenizer), f"generate/samples-{attention}.txt")
        if tracker.enabled:
            print(f"[sparta] logged generate/* to MLflow run {run_id}")


if __name__ == "__main__":
    main()
