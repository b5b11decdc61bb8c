"""The Sparse-vDiT workflow on a trained video DiT (one GPU): train dense, search a plan, time the plan's
attention on the model's own q/k/v, sample dense and sparse from the same noise, fine-tune with the plan.

    python benchmarks/vdit.py --root /tmp/vdit --results DIR [--stages train search attention sample finetune]
                              [--experiment vdit_13x30x52] [--train-steps N] [--finetune-steps N]
                              [--max-error E] [--compile] [--videos DIR]

Every stage is the command a user runs, on the run names `vdit-dense` and `vdit-plan` under --root
(stages left out reuse what an earlier call left there):
- train: `launch/train.py experiment=vdit_13x30x52` (Ray Train + DeepSpeed, bf16), dense attention.
  The attention stage needs a GPU; the others also run on CPU workers (--experiment vdit_smoke).
- search: `launch/search.py vdit-dense max_error=E`: the cheapest plan within calibration error E.
- attention: the model's q/k/v at every layer (2 validation clips at t = 0.5, bf16), each layer's
  attention dense through cuDNN, through sparta's kernels with the plan, and through FlexAttention
  with the plan's block masks (per head group); totals over layers. Records `bench: "patterns"`,
  case `vdit-plan-<grid>`, one per implementation.
- sample: `launch/generate.py vdit-dense`: dense and plan samples from the same noise (training-free
  Sparse-vDiT): end-to-end speed-up, PSNR, SSIM, attention share; with --compile both kinds sample
  through torch.compile'd blocks (`compile=true`).
- finetune: `launch/train.py ... trainer.init_from=vdit-dense model.plan=PLAN` (sparse forward and
  backward through the Triton kernels), then `launch/generate.py vdit-plan` with the plan it trained with.
At the end one `bench: "quality"` record, case `vdit-plan-<grid>`, with what the stages measured
(validation losses of the dense and the fine-tuned model, sampling speed-ups, PSNR, SSIM, the plan).
"""
import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from sparta.attention import Plan, attend, capture_qkv
from sparta.platform.models import config_from_dict
from sparta.platform.runs import load_model, read_config, resolve
from sparta.platform.vdit import interpolate
from sparta.platform.video_data import VAL_OFFSET, ProceduralVideo, VideoDataConfig

import harness
from patterns import cudnn, flex_attend, median_ms, relative_error

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "search", "attention", "sample", "finetune")


class Bench:
    def __init__(self, args):
        self.args, self.root = args, args.root.resolve()
        self.uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.state_file = self.root / "vdit-bench.json"  # what earlier stages (maybe earlier calls) measured
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def save(self, **values) -> None:
        self.state.update(values)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def forget(self, *keys: str) -> None:
        """What an earlier call measured of the model or plan that this call replaces."""
        for key in keys:
            self.state.pop(key, None)

    def checkpoint(self, run: str) -> Path:
        return resolve(run, self.uri)[0]

    def run_metrics(self, run: str) -> dict[str, float]:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri).get_run(resolve(run, self.uri)[1]).data.metrics

    def launch(self, script: str, *args: str) -> None:
        command = [sys.executable, str(REPO / "launch" / script), *args, "--tracking-uri", self.uri]
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=REPO, check=True)

    # ---- stages ------------------------------------------------------------------------------------

    def train(self) -> None:
        self.forget("search", "attention", "sample", "finetune", "sample_finetuned")
        steps = self.args.train_steps
        shorter = [f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", f"trainer.eval_every={steps}",
                   f"deepspeed.lr_schedule.warmup_steps={max(1, steps // 16)}"] if steps else []
        result = harness.train(self.root, "vdit-dense", f"experiment={self.args.experiment}", *shorter)
        self.save(dense=self.train_summary(result))

    def search(self) -> None:
        self.forget("attention", "sample", "finetune", "sample_finetuned")
        self.launch("search.py", "vdit-dense", f"max_error={self.args.max_error}", f"clips={self.args.calibration_clips}")
        metrics = self.run_metrics("vdit-dense")
        plan = Plan.load(self.checkpoint("vdit-dense") / "search" / "plan.yaml")
        self.save(search={"max_error": self.args.max_error, "calibration_clips": self.args.calibration_clips,
                          "lam": metrics["search/lam"], "calibration_error": round(metrics["search/calibration_error"], 5),
                          "predicted_speedup": round(metrics["search/predicted_speedup"], 3),
                          "density": round(mean_density(plan), 4),
                          "patterns": dict(Counter(p.name for layer in plan.layers.values() for p in layer))})

    def attention(self) -> None:
        """Each layer's attention on the model's own q/k/v: cuDNN, sparta with the plan, FlexAttention."""
        model_dir = self.checkpoint("vdit-dense")
        plan = Plan.load(model_dir / "search" / "plan.yaml")
        qkv = captured_qkv(model_dir)
        torch._dynamo.config.cache_size_limit = 64  # FlexAttention compiles once per head-group size
        times = {"cudnn": 0.0, "sparta": 0.0, "flex": 0.0}
        flops = {"dense": 0.0, "plan": 0.0}
        errors, per_layer = [], []
        for layer, (q, k, v) in sorted(qkv.items()):
            groups = plan(q, k, layer)
            dense_out = cudnn(q, k, v)
            layer_ms = {"cudnn": median_ms(lambda: cudnn(q, k, v)),
                        "sparta": median_ms(lambda: attend(q, k, v, plan(q, k, layer)))}
            errors.append(relative_error(attend(q, k, v, groups), dense_out))
            flex_runs = [flex_attend(q[:, list(g.heads)], k[:, list(g.heads)], v[:, list(g.heads)], g.layout)
                         for g in groups if g.layout.density().sum() > 0]
            layer_ms["flex"] = median_ms(lambda: [run() for run in flex_runs])
            for impl, ms in layer_ms.items():
                times[impl] += ms
            batch, heads, tokens, head_dim = q.shape
            flops["dense"] += 4 * batch * heads * tokens**2 * head_dim
            flops["plan"] += 4 * batch * tokens**2 * head_dim * sum(s["density"] for s in plan.stats[layer])
            per_layer.append(round(layer_ms["cudnn"] / layer_ms["sparta"], 3))
            print(f"[bench] layer {layer}: cudnn {layer_ms['cudnn']:.3f} ms, sparta {layer_ms['sparta']:.3f} ms, "
                  f"flex {layer_ms['flex']:.3f} ms, rel_err {errors[-1]:.4f}", flush=True)
        batch, heads, tokens, head_dim = next(iter(qkv.values()))[0].shape
        common = {**harness.metadata("patterns"), "case": f"vdit-plan-{grid_name(model_dir)}", "pass": "fwd",
                  "shape": {"batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim,
                            "layers": len(qkv), "dtype": "bfloat16"},
                  "qkv": "the trained vdit-dense model's, 2 validation clips at t = 0.5",
                  "density": round(mean_density(plan), 4), "mlflow_run": read_config(model_dir).get("mlflow_run_id")}
        records = {}
        for impl, ms in times.items():
            work = flops["dense"] if impl == "cudnn" else flops["plan"]
            records[impl] = {**common, "impl": impl, "ms": round(ms, 3), "tflops": round(work / ms / 1e9, 1),
                             "speedup": round(times["cudnn"] / ms, 3)}
        records["sparta"].update(rel_err=round(sum(errors) / len(errors), 5), rel_err_max=round(max(errors), 5),
                                 speedup_per_layer=per_layer, speedup_vs_flex=round(times["flex"] / times["sparta"], 3))
        for record in records.values():
            harness.append(self.args.results / harness.results_path("patterns").name, record)
            print("patterns", record, flush=True)
        self.save(attention={"speedup": records["sparta"]["speedup"], "speedup_vs_flex": records["sparta"]["speedup_vs_flex"],
                             "rel_err": records["sparta"]["rel_err"], "cudnn_ms": records["cudnn"]["ms"],
                             "sparta_ms": records["sparta"]["ms"], "flex_ms": records["flex"]["ms"]})

    def sample(self, run: str = "vdit-dense", key: str = "sample") -> None:
        args = self.args
        formats = "[gif,mp4]" if importlib.util.find_spec("imageio_ffmpeg") else "[gif]"  # MP4 needs its ffmpeg
        self.launch("generate.py", run, f"samples={args.samples}", f"steps={args.sample_steps}",
                    f"cfg_scale={args.cfg_scale}", "attention=both", f"formats={formats}", f"compile={args.compile}")
        metrics = self.run_metrics(run)
        self.save(**{key: {name.removeprefix("generate/video/"): round(value, 4) for name, value in metrics.items()
                           if name.startswith("generate/video/")}})
        if args.videos:
            args.videos.mkdir(parents=True, exist_ok=True)
            for gif in sorted((self.checkpoint(run) / "generate").glob("video-*.gif")):
                shutil.copyfile(gif, args.videos / f"{run}-{gif.name}")

    def finetune(self) -> None:
        steps = self.args.finetune_steps
        plan = self.checkpoint("vdit-dense") / "search" / "plan.yaml"
        result = harness.train(self.root, "vdit-plan", f"experiment={self.args.experiment}", "trainer.init_from=vdit-dense",
                               f"model.plan={plan}",
                               f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}",
                               f"trainer.eval_every={steps}", f"deepspeed.lr_schedule.warmup_steps={max(1, steps // 10)}",
                               f"deepspeed.optimizer.lr={self.args.finetune_lr}")
        self.save(finetune=self.train_summary(result))
        self.sample("vdit-plan", "sample_finetuned")

    @staticmethod
    def train_summary(result: dict) -> dict:
        return {"steps": int(result["params"]["trainer.max_steps"]), "val_loss": round(result["metrics"]["val/loss"], 5),
                "train_loss": round(result["metrics"]["train/loss"], 5), "wall_s": round(result["wall_s"], 1),
                "tokens_per_s": round(harness.steady(result["history"]["train/tokens_per_s"])),
                "mlflow_run": result["run_id"]}

    def quality_record(self) -> dict:
        s = self.state
        dense, tuned = s.get("dense", {}), s.get("finetune", {})
        ratio = tuned["val_loss"] / dense["val_loss"] if dense.get("val_loss") and tuned.get("val_loss") else None
        return {**harness.metadata("quality"), "case": f"vdit-plan-{grid_name(self.checkpoint('vdit-dense'))}",
                "impl": "sparta (Sparse-vDiT search, Triton block-sparse kernels, tile-major tokens)",
                "baseline": "the same model with dense cuDNN attention, same noise, same device",
                "experiment": self.args.experiment, "dense": dense, "search": s.get("search"), "attention": s.get("attention"),
                "sample": s.get("sample"), "finetune": tuned, "sample_finetuned": s.get("sample_finetuned"),
                "finetuned_val_loss_ratio": round(ratio, 4) if ratio else None,
                "sampling": {"samples": self.args.samples, "steps": self.args.sample_steps, "cfg_scale": self.args.cfg_scale,
                             "compile": self.args.compile}}


def grid_name(model_dir: Path) -> str:
    grid = config_from_dict(read_config(model_dir)["model_config"]).grid
    return f"{grid.frames}x{grid.height}x{grid.width}"


def mean_density(plan: Plan) -> float:
    densities = [head["density"] for layer in plan.stats.values() for head in layer]
    return sum(densities) / len(densities)


@torch.no_grad()
def captured_qkv(model_dir: Path, clips: int = 2, t: float = 0.5) -> dict[int, tuple]:
    """{layer: (q, k, v)} of the model (bf16, GPU) on validation clips noised to t, tile-major."""
    model, config = load_model(model_dir)
    model.to("cuda", torch.bfloat16).eval()
    videos, labels = ProceduralVideo(VideoDataConfig(**config["video_data"])).batch(
        [VAL_OFFSET + index for index in range(clips)])
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(1))
    times = torch.full((clips,), t)
    qkv = {}
    with capture_qkv(model, lambda layer, q, k, v: qkv.__setitem__(layer, (q, k, v))):
        model.velocity(interpolate(videos, noise, times).to("cuda", torch.bfloat16), times.cuda(), labels.cuda())
    return qkv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="cluster.root of the runs (MLflow store, checkpoints)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--experiment", default="vdit_13x30x52", help="the video DiT experiment (vdit_smoke: a CPU check)")
    parser.add_argument("--train-steps", type=int, default=None, help="dense training steps (default: the experiment's)")
    parser.add_argument("--max-error", type=float, default=0.05, help="the search's calibration error budget")
    parser.add_argument("--calibration-clips", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="clips sampled by each generate call")
    parser.add_argument("--sample-steps", type=int, default=25, help="Euler steps of each sample")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="sample through torch.compile'd blocks (both kinds)")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="directory of the results files")
    parser.add_argument("--videos", type=Path, default=None, help="also copy the sampled GIFs here")
    args = parser.parse_args()
    bench = Bench(args)
    started = time.perf_counter()
    for stage in STAGES:
        if stage in args.stages:
            print(f"[bench] {stage} ({time.perf_counter() - started:.0f} s since start)", flush=True)
            harness.keep_going(getattr(bench, stage))
    if {"attention", "sample", "finetune"} & set(args.stages):  # a call that only trains or searches measured nothing
        record = bench.quality_record()
        harness.append(args.results / harness.results_path("quality").name, record)
        print("quality", json.dumps(record), f"({time.perf_counter() - started:.0f} s since start)", flush=True)


if __name__ == "__main__":
    main()
