"""Parallel layouts against one worker: the MoE LM trained through `launch/train.py` (Ray Train +
DeepSpeed ZeRO-2) with its workers laid out as data x expert x sequence.

    python benchmarks/scale.py --root /tmp/scale [--experiment smoke_moe] [--steps 40] [--only 1 d2 e2 s2 ...]

Every layout keeps 4 sequences per data shard and step (sequence-parallel ranks share theirs), so a
layout with more data shards trains more tokens per step: tokens/s is the global rate, `speedup` is
it over the one-worker run's, `efficiency` the speedup per worker. On CPU workers (gloo) this measures
the layouts' overhead, not GPU scaling: the workers share the machine's cores
(`trainer.cpus_per_worker` is set so that they fit). One `scale` record per layout.
"""
import argparse
import os
from pathlib import Path

import harness

# name: (data, expert, sequence)
LAYOUTS = {"1": (1, 1, 1), "d2": (2, 1, 1), "e2": (1, 2, 1), "s2": (1, 1, 2), "d2e2": (2, 2, 1), "e2s2": (1, 2, 2)}
SEQUENCES_PER_SHARD = 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="cluster.root of the runs (MLflow store, checkpoints)")
    parser.add_argument("--experiment", default="smoke_moe", help="the model and data (configs/experiment/)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="directory of the results files")
    args = parser.parse_args()
    root, meta = args.root.resolve(), harness.metadata("scale")
    baseline = None
    for name in ("1", *(n for n in args.only if n != "1")):
        data, expert, sequence = LAYOUTS[name]
        workers = data * expert * sequence
        run = harness.keep_going(
            harness.train, root, f"layout-{name}", f"experiment={args.experiment}", f"trainer.num_workers={workers}",
            f"trainer.cpus_per_worker={min(1.0, (os.cpu_count() or 1) / workers):g}",
            f"parallel.expert={expert}", f"parallel.sequence={sequence}",
            f"deepspeed.micro_batch_size={SEQUENCES_PER_SHARD}", f"trainer.max_steps={args.steps}",
            f"trainer.eval_every={args.steps}", f"trainer.checkpoint_every={args.steps}", "trainer.log_every=5")
        if run is None:
            continue
        p = run["params"]
        tokens_per_s = harness.steady(run["history"]["train/tokens_per_s"])
        tokens_per_step = data * expert * SEQUENCES_PER_SHARD * int(p["data.seq_len"])
        baseline = baseline or tokens_per_s
        record = {**meta, "case": f"scale-{args.experiment}-d{p['model.d_model']}-L{p['model.n_layers']}-seq{p['data.seq_len']}",
                  "impl": f"sparta (launch/train.py, Ray Train + DeepSpeed ZeRO-{p['deepspeed.zero_stage']})",
                  "layout": {"data": data, "expert": expert, "sequence": sequence}, "workers": workers,
                  "tokens_per_s": round(tokens_per_s), "step_ms": round(1000 * tokens_per_step / tokens_per_s, 1),
                  "baseline": "the same model on one worker, same run", "speedup": round(tokens_per_s / baseline, 3),
                  "efficiency": round(tokens_per_s / baseline / workers, 3), "steps": args.steps,
                  "mlflow_run": run["run_id"]}
        harness.append(args.results / harness.results_path("scale").name, record)
        print("scale", record, flush=True)


if __name__ == "__main__":
    main()
