"""Sample from a trained masked diffusion LM (model.family=dlm) with dense or SparseD attention.

    python launch/generate.py RUN [key=value ...]     # RUN: MLflow run id, sparta run name, checkpoint or export dir
    python launch/generate.py dlm prompt="def fibonacci(n):" gen_len=64 block_len=32 steps=64
    python launch/generate.py dlm prompt_tokens=16000 gen_len=128 attention=sparsed sparsed.keep_ratio=0.3

Keys: the prompt, from exactly one of prompt (text), prompt_file (a text file) or prompt_tokens (that
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
the denoising steps. Exit code 2: bad input, refused before any sampling.
"""

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from sparta.platform.data import TOKENIZER_FILE, load_tokenizer, open_corpus
from sparta.platform.dlm import SamplerConfig, check_sampler, generate, sparsed_schedule, use_attention
from sparta.platform.models import config_from_dict
from sparta.platform.runs import cli, load_model, read_config, resolve_cli
from sparta.platform.tracking import Tracker


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


def parse_config(overrides: list[str]) -> GenerateConfig:
    """key=value overrides onto the defaults; `prompt` is taken verbatim (code is not YAML)."""
    config = OmegaConf.structured(GenerateConfig)
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


def main(argv: list[str] | None = None) -> None:
    parser = cli(__doc__, "MLflow run id, sparta run name, checkpoint or export directory of a model.family=dlm run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings (see above)")
    args = parser.parse_intermixed_args(argv)
    model_dir, run_id, uri = resolve_cli(args, "generate")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = parse_config(args.overrides)
        run_config = read_config(model_dir)
        family = run_config["model_config"].get("family", "lm")
        if family != "dlm":
            raise ValueError(f"{args.run}: a checkpoint of model.family={family}; launch/generate.py samples "
                             "model.family=dlm runs (masked diffusion LMs)")
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
