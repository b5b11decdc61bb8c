"""SparseD in generation: a masked diffusion LM sampled with dense cuDNN attention and with SparseD at
long context, same seed (one GPU).

    python benchmarks/dlm.py --root /tmp/dlm --results DIR [--run RUN] [--contexts 16384 65536] [--train-steps N]

Trains `experiment=dlm_long` through `launch/train.py` (Ray Train + DeepSpeed, bf16; skipped when --run
names a trained dLM: run id, run name or checkpoint), then for each context fills it with a prompt of
validation tokens (all but the answer's gen_len) and samples with `launch/generate.py`'s timed
sampler twice: dense, then SparseD (same seed). One `quality` record per context, case
`dlm-sparsed-<context>`: end-to-end speedup (dense wall / SparseD wall, denoising steps only),
token agreement, share of attention blocks computed, and, from single model calls on the finished
sequence, the attention share of a dense step (step time minus a step whose attention outputs
zeros, over the step time) and the attention-only speedup after the switch step.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sparta.platform.dlm import SparseDConfig, check_sampler, sparsed_schedule, use_attention
from sparta.platform.models import config_from_dict
from sparta.platform.runs import load_model, read_config, resolve

import harness

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import generate  # noqa: E402  (launch/generate.py: the timed sampler that this benchmark measures)


def train(root: Path, name: str, steps: int | None) -> None:
    shorter = [f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", f"trainer.eval_every={steps}",
               f"deepspeed.lr_schedule.warmup_steps={steps // 10}"] if steps else []
    harness.train(root, name, "experiment=dlm_long", *shorter)


def median_ms(call, repeats: int = 5) -> float:
    call()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def step_times(model, x: torch.Tensor, cfg, prompt_len: int, backend: str) -> dict[str, float]:
    """One denoising step's model call on the finished sequence: dense, without attention (every
    head outputs zeros: an empty head-group list), and SparseD after its switch step."""
    block = (prompt_len, prompt_len + cfg.block_len)

    def call():
        return model.logits(x, *block)

    with generate.dense_sdpa_first(x.device), torch.no_grad():
        use_attention(model, None, backend)
        dense = median_ms(call)
        use_attention(model, lambda q, k, layer: [], backend)
        no_attention = median_ms(call)
        schedule = sparsed_schedule(cfg, prompt_len)
        schedule.step = cfg.steps - 1
        use_attention(model, schedule, backend)
        sparse = median_ms(call)  # the first (untimed) call selects the masks
    use_attention(model, None, backend)
    return {"dense_step_ms": dense, "no_attention_step_ms": no_attention, "sparsed_step_ms": sparse}


def measure(model, model_dir: Path, run_config: dict, context: int, args, device: torch.device) -> dict:
    cfg = generate.GenerateConfig(prompt_tokens=context - args.gen_len, gen_len=args.gen_len, steps=args.steps,
                                  block_len=args.block_len, attention="sparsed", seed=0,
                                  sparsed=SparseDConfig(skip_ratio=args.skip_ratio, keep_ratio=args.keep_ratio,
                                                        block=args.block))
    prompt, _ = generate.build_prompt(cfg, model_dir, run_config)
    backend = check_sampler(cfg, config_from_dict(run_config["model_config"]), prompt.shape[1], device)
    prompt = prompt.to(device)
    runs = {attention: generate.sample(model, prompt, cfg, attention, backend) for attention in ("dense", "sparsed")}
    metrics = generate.report(runs)
    x = torch.cat([prompt, runs["dense"].tokens.to(device)], dim=1)
    switch = sparsed_schedule(cfg, prompt.shape[1]).switch_step
    steps = step_times(model, x, cfg, prompt.shape[1], backend)
    attention_dense = steps["dense_step_ms"] - steps["no_attention_step_ms"]
    attention_sparse = steps["sparsed_step_ms"] - steps["no_attention_step_ms"]
    return {
        "case": f"dlm-sparsed-{context}", "impl": "sparta (launch/generate.py, SparseD, Triton block-sparse kernel)",
        "baseline": "the same sampler with dense cuDNN SDPA, same seed, same device",
        "context": context, "prompt_tokens": prompt.shape[1], "gen_len": cfg.gen_len, "steps": cfg.steps,
        "block_len": cfg.block_len, "skip_ratio": cfg.sparsed.skip_ratio,
        "keep_ratio": cfg.sparsed.keep_ratio if cfg.sparsed.keep_ratio is not None else (0.3 if context >= 4096 else 0.5),
        "block": cfg.sparsed.block,
        "speedup": round(metrics["generate/sparsed/speedup"], 3),
        "agreement": round(metrics["generate/sparsed/agreement"], 4),
        "block_fraction": round(metrics["generate/sparsed/block_fraction"], 4),
        "dense_tokens_per_s": round(metrics["generate/dense/tokens_per_s"], 1),
        "sparsed_tokens_per_s": round(metrics["generate/sparsed/tokens_per_s"], 1),
        "dense_wall_s": round(runs["dense"].wall_s, 3), "sparsed_wall_s": round(runs["sparsed"].wall_s, 3),
        "switch_step_ms": round(1000 * runs["sparsed"].step_seconds[switch], 2) if switch < cfg.steps else None,
        **{key: round(value, 3) for key, value in steps.items()},
        "attention_share": round(attention_dense / steps["dense_step_ms"], 4),
        "attention_speedup": round(attention_dense / attention_sparse, 3) if attention_sparse > 0 else None,
        "trained_seq_len": run_config["seq_len"], "train_step": run_config.get("step"),
        "mlflow_run": run_config.get("mlflow_run_id"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="cluster.root of the training run (MLflow store, checkpoints)")
    parser.add_argument("--run", help="a trained dLM (run id, run name or checkpoint dir) instead of training one")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps (default: the experiment's)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128, help="denoising steps")
    parser.add_argument("--block-len", type=int, default=32)
    parser.add_argument("--skip-ratio", type=float, default=0.2)
    parser.add_argument("--keep-ratio", type=float, default=None, help="default: SparseD's (0.3 from 4k tokens)")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="directory of the results files")
    args = parser.parse_args()
    root = args.root.resolve()
    started = time.perf_counter()
    if args.run is None:
        train(root, "dlm", args.train_steps)
        print(f"[bench] trained in {time.perf_counter() - started:.0f} s", flush=True)
    model_dir, _ = resolve(args.run or "dlm", f"sqlite:///{root / 'mlflow.db'}")
    run_config = read_config(model_dir)
    model, _ = load_model(model_dir)
    device = torch.device("cuda")
    model.to(device, torch.bfloat16).eval()
    meta = harness.metadata("quality")
    for context in args.contexts:
        record = harness.keep_going(measure, model, model_dir, run_config, context, args, device)
        if record:
            harness.append(args.results / harness.results_path("quality").name, {**meta, **record})
            print("quality", record, f"({time.perf_counter() - started:.0f} s since start)", flush=True)


if __name__ == "__main__":
    main()
