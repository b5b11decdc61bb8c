"""Offline attention pattern search (Sparse-vDiT) for a trained video DiT: a per-layer, per-head plan.

    python launch/search.py RUN [--tracking-uri URI] [key=value ...]   # RUN: run id, run name, checkpoint or export dir
    python launch/search.py vdit-smoke clips=8 times=[0.2,0.5,0.8] lam=0.02

Calibration: `clips` clips of the procedural video source at the run's clip size (validation clips,
which training never saw), each noised to every level in `times` (x_t = (1 - t) x0 + t noise), run
densely through the model inside `capture_qkv`: every layer hands its q, k, v (tile-major, rotary
applied) to a `PatternSearch` (the `video_candidates` sweep with the model's tile, the measured cost
table of attention/pattern_costs.json, `lam`), which scores each candidate pattern per head against
dense attention. The plan is built for the model's token order, so tiles of the model's own tile run
on its tokens in place.

Keys: clips (4), times ([0.25, 0.5, 0.75]), lam (0.01), max_error (none: when set, lam is swept down
from 1 and the cheapest plan whose calibration error, the root mean relative MSE over all heads,
is at most max_error wins; it replaces lam), block (the tile's token count if a kernel block size,
else 128), backend (auto | triton | reference: what computes the sparse outputs of the error term;
auto: triton on a GPU, reference on the CPU), seed (0: the noise), out (default
<checkpoint>/search). The clips are the run's own validation clips (its data.* settings and seed).

Writes out/plan.yaml (`sparta.attention.Plan.load` reads it) and out/layouts/layer_XX.png (each
head's block mask as its kernel sees it); with an MLflow run, logs them as search/plan.yaml and
search/layouts/ plus search/predicted_speedup (dense attention time over the plan's, from the cost
model), search/calibration_error and search/lam at the checkpoint's step. Prints one line per layer
and the predicted speed-up. A progress bar follows the layers of each calibration call. Exit code 2:
bad input, refused before any work.
"""

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from sparta.attention import BlockLayout, PatternSearch, Plan, calibration_error, capture_qkv, video_candidates
from sparta.kernels.block_layout import SUPPORTED_BLOCK_SIZES
from sparta.platform.runs import cli, load_model, read_config, resolve_cli
from sparta.platform.vdit import interpolate
from sparta.platform.video_data import VAL_OFFSET, ProceduralVideo, VideoDataConfig


@dataclass
class SearchConfig:
    clips: int = 4                   # calibration clips
    times: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # noise levels t of each clip
    lam: float = 0.01                # weight of the relative attention time against the relative MSE
    max_error: float | None = None   # or: the cheapest plan within this calibration error (replaces lam)
    block: int | None = None         # kernel block (tokens); None: the model's tile if it is one
    backend: str = "auto"            # auto | triton | reference
    seed: int = 0                    # the calibration noise
    out: str | None = None           # output directory; None: <checkpoint>/search


def parse_config(overrides: list[str]) -> SearchConfig:
    config = OmegaConf.structured(SearchConfig)
    try:
        for override in overrides:
            if "=" not in override:
                raise ValueError(f"{override!r}: expected key=value")
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([override]))
        cfg = OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ValueError(f"{error.full_key}: {str(error).splitlines()[0]}") from None
    if cfg.clips < 1:
        raise ValueError(f"clips={cfg.clips}: expected >= 1")
    if not cfg.times or any(not 0.0 < t <= 1.0 for t in cfg.times):
        raise ValueError(f"times={cfg.times}: expected noise levels in (0, 1]")
    if cfg.block is not None and cfg.block not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block={cfg.block}: expected one of {SUPPORTED_BLOCK_SIZES} (the kernel's block sizes)")
    if cfg.max_error is not None and cfg.max_error < 0:
        raise ValueError(f"max_error={cfg.max_error}: expected >= 0 (a root mean relative MSE)")
    if cfg.backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={cfg.backend!r}: expected auto, triton or reference")
    return cfg


def default_block(tile: tuple[int, int, int]) -> int:
    """One tile per block, so that the model's own tiles are whole blocks; else the kernel's largest."""
    volume = math.prod(tile)
    return volume if volume in SUPPORTED_BLOCK_SIZES else max(SUPPORTED_BLOCK_SIZES)


@torch.no_grad()
def search(model, cfg: SearchConfig, video: VideoDataConfig, backend: str, device: torch.device) -> tuple[Plan, float]:
    """Calibrate (clips x times dense forward passes on clips of `video`) and return the chosen plan and
    its lam."""
    mcfg = model.cfg
    block = cfg.block or default_block(mcfg.tile)
    searcher = PatternSearch(mcfg.grid, video_candidates(mcfg.grid, block=block, tile=mcfg.tile), block=block,
                             lam=cfg.lam, backend=backend, token_order=model.order)
    videos, labels = ProceduralVideo(video).batch([VAL_OFFSET + index for index in range(cfg.clips)])
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(videos.shape, generator=generator)
    with tqdm(total=len(cfg.times) * mcfg.n_layers, desc="search", unit="layer", file=sys.stderr) as bar:
        def observe(layer, q, k, v):
            searcher.observe(layer, q, k, v)
            bar.update()

        with capture_qkv(model, observe):
            for t in cfg.times:
                x_t = interpolate(videos, noise, torch.full((cfg.clips,), t))
                model.velocity(x_t.to(device), torch.full((cfg.clips,), t, device=device), labels.to(device))
    return searcher.plan_within(cfg.max_error) if cfg.max_error is not None else (searcher.plan(), cfg.lam)


def predicted_speedup(plan: Plan) -> float:
    """Dense attention time over the plan's: every head of every layer, with the cost model's times."""
    costs = [head["cost"] for layer in plan.stats.values() for head in layer]
    return len(costs) / max(sum(costs), 1e-6)  # a plan that skips every head costs (almost) nothing


def write(plan: Plan, out: Path) -> list[Path]:
    """plan.yaml and one picture per layer (a panel per head); the files written."""
    (out / "layouts").mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.yaml")
    files = [out / "plan.yaml"]
    tokens = plan.grid.tokens
    for layer, patterns in sorted(plan.layers.items()):
        # Each head's blocks in its own kernel order (orders differ between heads, so no concat_heads).
        masks = torch.cat([plan.layout(pattern).mask for pattern in patterns], dim=1)
        files.append(out / "layouts" / f"layer_{layer:02d}.png")
        BlockLayout(masks, tokens, tokens, plan.block, plan.block).save_png(files[-1])
    return files


def log_to_run(uri: str, run_id: str, out: Path, metrics: dict[str, float], step: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.log_artifact(run_id, str(out / "plan.yaml"), "search")
    client.log_artifacts(run_id, str(out / "layouts"), "search/layouts")
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)


def main(argv: list[str] | None = None) -> None:
    parser = cli(__doc__, "MLflow run id, sparta run name, checkpoint or export directory of a model.family=vdit run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings (see above)")
    args = parser.parse_intermixed_args(argv)
    model_dir, run_id, uri = resolve_cli(args, "search")
    try:
        cfg = parse_config(args.overrides)
        run_config = read_config(model_dir)
        family = run_config["model_config"].get("family", "lm")
        if family != "vdit":
            raise ValueError(f"{args.run}: a checkpoint of model.family={family}; launch/search.py searches "
                             "attention patterns of model.family=vdit runs (video DiTs)")
        video = VideoDataConfig(**run_config["video_data"])
    except ValueError as error:
        print(f"search: {error}", file=sys.stderr)
        sys.exit(2)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = ("triton" if device.type == "cuda" else "reference") if cfg.backend == "auto" else cfg.backend
    model, _ = load_model(model_dir)
    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()  # as the sampler runs it
    plan, lam = search(model, cfg, video, backend, device)
    out = Path(cfg.out) if cfg.out else model_dir / "search"
    write(plan, out)
    metrics = {"search/predicted_speedup": predicted_speedup(plan), "search/calibration_error": calibration_error(plan),
               "search/lam": lam}
    for layer, patterns in sorted(plan.layers.items()):
        print(f"[sparta] layer {layer:2d}: " + ", ".join(f"h{head} {pattern} ({plan.stats[layer][head]['density']:.0%})"
                                                         for head, pattern in enumerate(patterns)))
    print(f"[sparta] predicted attention speed-up {metrics['search/predicted_speedup']:.2f}x, calibration error "
          f"{metrics['search/calibration_error']:.4f} at lam {lam:.4g}; plan: {out / 'plan.yaml'}")
    if run_id:
        log_to_run(run_config.get("tracking_uri") or uri, run_id, out, metrics, run_config.get("step", 0))
        print(f"[sparta] logged search/plan.yaml, search/layouts/ and search/* metrics to MLflow run {run_id}")


if __name__ == "__main__":
    main()
