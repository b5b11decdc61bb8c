"""Language models trained through `launch/train.py` (Ray Train + DeepSpeed, bf16, one GPU): speed and quality.

- `train` records: tokens/s and MFU (against the device's dense bf16 peak) of the 0.31B dense LM and
  of each MoE LM (MFU of its active FLOPs: routed experts counted as many times as tokens used them);
- `quality` records: validation loss and sparsity of the BlockFFN, top-k and MoE++ LMs trained on the
  same tokens. The BlockFFN LM runs first; the top-k and MoE++ LMs then get k = round(E * (1 - TLS)),
  its measured activation rate, so the three use about as many experts per token.

    python benchmarks/lm.py --root /tmp/lm [--only dense blockffn topk moepp] [--steps N] [--dense-steps N] [--compile]
                            [--top-k K] [--set KEY=VALUE ...]

The dense LM runs first (a short run is enough for its speed), then BlockFFN, top-k, MoE++. With
--compile each run is followed by the same run with trainer.compile=true, whose train record carries
its speedup over the eager one. --top-k K sets k for a call without the BlockFFN run (K from an
earlier call's BlockFFN record). --set adds Hydra overrides to every run (e.g. trainer.compile=true: the
compiled runs alone).

Each run is a real `launch/train.py` job (its MLflow store and checkpoints under --root); records are
appended to benchmarks/results/{train,quality}-<device>.jsonl (or --results DIR) as each run ends.
"""
import argparse
from pathlib import Path

from sparta.platform.plots import ZERO_COMPUTATION_KEYS

import harness

MOE_RUNS = ("blockffn", "topk", "moepp")


def speed_record(name: str, run: dict) -> dict:
    p = run["params"]
    tokens_per_s = harness.steady(run["history"]["train/tokens_per_s"])
    experts = f"-E{p['moe.num_experts']}k{p['moe.top_k']}f{p['moe.d_ff']}" if name in ("topk", "moepp") else ""
    record = {"case": f"lm-{name}-d{p['model.d_model']}-L{p['model.n_layers']}-seq{p['data.seq_len']}{experts}",
              "impl": f"sparta (launch/train.py, Ray Train + DeepSpeed ZeRO-{p['deepspeed.zero_stage']}, bf16"
                      f"{', compiled' if p['trainer.compile'] == 'True' else ''}"
                      f"{', CUDA graphs' if p.get('trainer.cuda_graphs') == 'True' else ''})",
              "pass": "train", "tokens_per_s": round(tokens_per_s), "micro_batch": int(p["deepspeed.micro_batch_size"]),
              "steps": int(p["trainer.max_steps"]), "accumulation": int(p["deepspeed.gradient_accumulation_steps"]),
              "mlflow_run": run["run_id"]}
    if run["history"]["train/mfu"]:
        mfu = harness.steady(run["history"]["train/mfu"])
        record.update(mfu=round(mfu, 4), baseline="device dense bf16 peak (datasheet)")
    if "gpu/peak_reserved_gib" in run["metrics"]:
        record["peak_reserved_gib"] = round(run["metrics"]["gpu/peak_reserved_gib"], 1)
    return record


def quality_record(name: str, run: dict, tokens: int) -> dict:
    m = run["metrics"]
    return {"case": f"lm-{name}-python_source", "impl": "sparta", "val_loss": round(m["val/loss"], 4),
            "tokens": tokens, "tls": round(m["moe/tls"], 4), "cls8": round(m["moe/cls8"], 4),
            "ffn_experts_per_token": round(m["moe/ffn_experts_per_token"], 3),
            **(zc_slot_fraction(run) if name == "moepp" else {}),
            "top_k": int(run["params"]["moe.top_k"]) if name != "blockffn" else None,
            "mlflow_run": run["run_id"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="cluster.root of the runs (MLflow store, checkpoints)")
    parser.add_argument("--only", nargs="+", choices=(*MOE_RUNS, "dense"), default=(*MOE_RUNS, "dense"))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of each MoE LM (default: the experiment's)")
    parser.add_argument("--dense-steps", type=int, default=None, help="optimizer steps of the dense LM")
    parser.add_argument("--compile", action="store_true", help="also run each LM with trainer.compile=true")
    parser.add_argument("--top-k", type=int, default=None,
                        help="k of the top-k and MoE++ LMs (default: the presets', or from this call's BlockFFN run)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="Hydra overrides of every run")
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="directory of the results files")
    args = parser.parse_args()
    root = args.root.resolve()
    meta = harness.metadata("train")

    def record(bench: str, values: dict) -> None:
        """Written as soon as a run ends: a device call may run out of time before the next one."""
        path = args.results / harness.results_path(bench).name
        harness.append(path, {**meta, "bench": bench, **values})
        print(bench, values, flush=True)

    def record_compiled(name: str, eager: dict, *overrides: str) -> None:
        compiled = harness.keep_going(harness.train, root, f"{name}-compiled", *overrides, "trainer.compile=true")
        if compiled:
            speedup = (harness.steady(compiled["history"]["train/tokens_per_s"])
                       / harness.steady(eager["history"]["train/tokens_per_s"]))
            record("train", {**speed_record(name, compiled), "speedup_vs_eager": round(speedup, 3),
                             "compile_s": round(compiled["metrics"]["train/compile_s"], 1),
                             **recompiles_after_warmup(compiled)})

    if "dense" in args.only:
        dense_steps = [f"trainer.max_steps={args.dense_steps}", f"trainer.checkpoint_every={args.dense_steps}",
                       f"trainer.eval_every={args.dense_steps}", "trainer.log_every=10",
                       f"deepspeed.lr_schedule.warmup_steps={args.dense_steps // 4}"] if args.dense_steps else []
        dense_steps += args.set
        run = harness.keep_going(harness.train, root, "dense", "experiment=lm_dense", *dense_steps)
        if run:
            record("train", speed_record("dense", run))
            if args.compile:
                record_compiled("dense", run, "experiment=lm_dense", *dense_steps)

    runs, top_k = {}, [f"moe.top_k={args.top_k}"] if args.top_k else []
    for name in (n for n in MOE_RUNS if n in args.only):
        steps = [f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
                 f"trainer.eval_every={args.steps // 2}"] if args.steps else []
        steps += args.set
        run = harness.keep_going(harness.train, root, name, f"experiment=lm_{name}", *steps, *top_k)
        if run is None:
            continue
        runs[name] = run
        if name == "blockffn":  # the other two use as many experts per token as BlockFFN measured
            experts = int(run["params"]["moe.num_experts"])
            top_k = [f"moe.top_k={max(1, round(experts * (1 - run['metrics']['moe/tls'])))}"]
        versus_topk = vs_topk(run, runs["topk"]) if name != "topk" and "topk" in runs else {}
        speed = speed_record(name, run)
        if name == "moepp" and versus_topk:
            speed.update(zc_slot_fraction(run), speedup_vs_topk=versus_topk["speedup_vs_topk"])
        record("train", speed)
        if args.compile:
            record_compiled(name, run, f"experiment=lm_{name}", *steps, *top_k)
        p = run["params"]
        tokens = int(p["trainer.max_steps"]) * int(p["deepspeed.micro_batch_size"]) * int(p["data.seq_len"])
        record("quality", {**quality_record(name, run, tokens), **versus_topk})
        if name == "topk" and "blockffn" in runs:  # BlockFFN ran first: its comparison comes now
            record("quality", {"case": "lm-blockffn-vs-topk-python_source", "impl": "sparta",
                               "val_loss": round(runs["blockffn"]["metrics"]["val/loss"], 4),
                               "topk_val_loss": round(run["metrics"]["val/loss"], 4), **vs_topk(runs["blockffn"], run)})


def zc_slot_fraction(run: dict) -> dict:
    """The share of the MoE++ LM's token-expert slots on zero-computation experts, at the end of the run."""
    return {"zc_slot_fraction": round(sum(run["metrics"].get(key, 0.0) for key in ZERO_COMPUTATION_KEYS), 4)}


def recompiles_after_warmup(run: dict) -> dict:
    """Graphs compiled after the first evaluation (the warm-up compiles the train and eval graphs),
    and over how many steps: 0 when routing that changes from step to step reuses the graphs."""
    graphs = run["history"]["train/compiled_graphs"]
    first_eval = int(run["params"]["trainer.eval_every"])
    warm = [step for step in graphs if step >= first_eval]
    if not warm:
        return {}
    return {"recompiles_after_warmup": int(graphs[max(warm)] - graphs[min(warm)]),
            "recompile_window_steps": max(warm) - min(warm)}


def vs_topk(run: dict, topk: dict) -> dict:
    return {"val_loss_vs_topk": round(run["metrics"]["val/loss"] / topk["metrics"]["val/loss"], 4),
            "speedup_vs_topk": round(harness.steady(run["history"]["train/tokens_per_s"])
                                     / harness.steady(topk["history"]["train/tokens_per_s"]), 3)}


if __name__ == "__main__":
    main()
