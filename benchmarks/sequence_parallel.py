"""What the Ulysses path costs when it splits nothing: attention with a one-rank sequence group against
none, on one GPU (bf16, forward + backward, the q/k/v/out projections and 1-D rotary included).

    python benchmarks/sequence_parallel.py [--results DIR] [--tokens 16384] [--dim 2048] [--heads 16]

With a group, `SparseAttention` runs both all-to-alls (sequence to heads and back, here over one rank:
a copy each) and its shard checks; without one it runs neither. The trainer passes no group at
`parallel.sequence=1`, so this is the overhead a user would pay if it did. One `scale` record per
implementation, case `ulysses-sp1-<tokens>`, with TFLOP/s (attention and projections) and the ratio.
"""
import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import triton

from sparta.attention import SparseAttention

import harness


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="directory of the results files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(scratch, 'init')}", rank=0, world_size=1)
        try:
            measure(args)
        finally:
            dist.destroy_process_group()


def measure(args) -> None:
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    # attention 4 N^2 D per head forward, 2.5x that backward; projections 2 * 4 dim^2 per token, 3x with backward
    flops = 3.5 * 4 * args.batch * args.tokens**2 * args.dim + 3 * 8 * args.batch * args.tokens * args.dim**2
    meta, ms = harness.metadata("scale"), {}
    for impl, group in (("no group", None), ("one-rank group", dist.new_group([0]))):
        torch.manual_seed(1)
        layer = SparseAttention(args.dim, args.heads, rotary="1d", max_tokens=args.tokens, sequence_group=group)
        layer = layer.to("cuda", torch.bfloat16)

        def step():
            x.grad = None
            layer(x).backward(grad)
        ms[impl] = triton.testing.do_bench(step, warmup=10, rep=200, return_mode="median")
        record = {**meta, "case": f"ulysses-sp1-{args.tokens}", "impl": f"sparta SparseAttention, {impl}",
                  "pass": "fwd+bwd", "shape": {"batch": args.batch, "tokens": args.tokens, "dim": args.dim,
                                               "heads": args.heads, "dtype": "bfloat16"},
                  "ms": round(ms[impl], 3), "tflops": round(flops / ms[impl] / 1e9, 1),
                  "overhead_vs_no_group": round(ms[impl] / ms["no group"] - 1, 4),
                  "baseline": "the same layer without a sequence group, same run"}
        harness.append(args.results / harness.results_path("scale").name, record)
        print("scale", record, flush=True)


if __name__ == "__main__":
    main()
