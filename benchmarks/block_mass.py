"""Block-mass benchmark: sparta's fused kernel vs `attention_block_mass`'s torch path vs a dense cuDNN
attention forward of the same shape, all measured in the same run (one GPU, bf16, head dim 128,
blocks of 128).

- mass-n{N}: 16 heads, N = 4,096 / 16,384 / 32,768 (the issue's target: 32k), bidirectional, the
  last 1,024 tokens a second region (SparseD's prompt and answer, ranked apart). q, k are
  patterns.py's synthetic dLM heads (every other one of its 32: local, sink, topic, uniform).
- mass-causal-n32768: the same with a causal mask and one region, kernel and causal cuDNN only (the
  torch path has no causal mask).
- sparsed-select-dlm-32768: SparseD's switch step as patterns.py times it (32 heads, 32k tokens, the
  last 1,024 the answer, keep 0.3): the whole `SparseDSchedule.select`, on the kernel and on the
  torch path (patterns.py's `select_ms`).

Fields: ms (median), ratio_vs_dense (ms over the dense cuDNN forward of q, k, v of this shape),
peak_mib (memory allocated beyond the inputs during the call), tflops (4 H N^2 D, halved when
causal: the kernel's two Q K^T passes equal a forward's Q K^T and P V), and on the sparta records
rel_err (vs the torch path), topk_identical (SparseD's top-30% per region from both, identical
masks), mismatched_rows, and tie_gap (largest relative mass difference, per the torch path, between
blocks that one selection keeps and the other drops; 0 when identical). --tune also times every
candidate launch config at 32k (impl "sparta-config").

    python benchmarks/block_mass.py [--results DIR] [--tune]
"""
import argparse
import math
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparta.attention import SparseDSchedule, attention_block_mass, selection
from sparta.kernels import block_mass
from sparta.kernels.block_mass import CANDIDATE_CONFIGS, TUNED_CONFIGS

import harness
import patterns

BLOCK, HEAD_DIM, HEADS, ANSWER, KEEP = 128, 128, 16, 1024, 0.3
LENGTHS = (4096, 16384, 32768)


def cudnn(q, k, v, causal=False):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def inputs(tokens, heads, seed=1):
    spec = patterns.DLM_HEADS_SPEC[::2] if heads == HEADS else patterns.DLM_HEADS_SPEC
    positions = torch.arange(tokens, device="cuda", dtype=torch.float32)[:, None]
    return patterns.synthetic_qkv(positions, spec, seed=seed)


def measure(fn, slow=False):
    """(result, median ms, MiB allocated beyond what was allocated before). Slow calls (the torch
    path, ~0.5 s) are timed 3 times after one warm-up instead of through do_bench."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    if not slow:
        return result, patterns.median_ms(fn, rep_ms=200), peak_mib
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return result, sorted(times)[1], peak_mib


def torch_path():
    """Inside it, attention_block_mass (and so SparseD) takes the torch path on the GPU too."""
    return mock.patch.object(selection, "block_mass_supports", lambda *args: False)


def regions_of(tokens):
    prompt_blocks = (tokens - ANSWER) // BLOCK
    return [(0, prompt_blocks), (prompt_blocks, -(-tokens // BLOCK))]


def topk_mask(mass, regions):
    """SparseD's selection: per region, the top ceil(KEEP * blocks) key blocks of each query block."""
    mask = torch.zeros_like(mass, dtype=torch.bool)
    for lo, hi in regions:
        mask[..., lo:hi].scatter_(-1, mass[..., lo:hi].topk(math.ceil(KEEP * (hi - lo)), dim=-1).indices, True)
    return mask


def selection_agreement(mask, expected_mask, expected_mass, regions):
    """topk_identical, mismatched rows, and the largest relative mass gap between swapped blocks."""
    mismatched, gap = 0, 0.0
    for lo, hi in regions:
        swapped = mask[..., lo:hi] != expected_mask[..., lo:hi]
        rows = swapped.any(-1)
        mismatched += int(rows.sum())
        if rows.any():
            values, swapped = expected_mass[..., lo:hi][rows], swapped[rows]
            top = torch.where(swapped, values, -math.inf).amax(-1)
            bottom = torch.where(swapped, values, math.inf).amin(-1)
            gap = max(gap, ((top - bottom) / top).max().item())
    return dict(topk_identical=mismatched == 0, mismatched_rows=mismatched, tie_gap=float(f"{gap:.3g}"))


class Recorder:
    def __init__(self, out_path: Path):
        self.out_path = out_path
        self.common = harness.metadata("block_mass")

    def record(self, case, impl, ms, dense_ms, peak_mib, heads, tokens, causal=False, **extra):
        flops = 4 * heads * tokens * tokens * HEAD_DIM * (0.5 if causal else 1.0)
        line = {**self.common, "case": case, "impl": impl, "pass": "fwd", "ms": round(ms, 4),
                "tflops": round(flops / ms / 1e9, 1), "ratio_vs_dense": round(ms / dense_ms, 3),
                "peak_mib": round(peak_mib, 1), "heads": heads, "tokens": tokens, "head_dim": HEAD_DIM,
                "block": BLOCK, "causal": causal, **extra}
        print(f"{case:28s} {impl:13s} {ms:9.3f} ms  x{line['ratio_vs_dense']:<7} {line['peak_mib']:9.1f} MiB  "
              + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        harness.append(self.out_path, line)


def bench_mass(rec, tokens):
    q, k, v = inputs(tokens, HEADS)
    regions = regions_of(tokens)
    starts = [lo for lo, _ in regions]
    case = f"mass-n{tokens}"
    _, dense_ms, dense_mib = measure(lambda: cudnn(q, k, v))
    rec.record(case, "cudnn", dense_ms, dense_ms, dense_mib, HEADS, tokens)
    expected, torch_ms, torch_mib = measure(lambda: _torch_sums(q, k, starts), slow=True)
    rec.record(case, "torch", torch_ms, dense_ms, torch_mib, HEADS, tokens)
    got, ms, mib = measure(lambda: block_mass(q, k, BLOCK, BLOCK, region_starts=starts))
    agreement = selection_agreement(topk_mask(got, regions), topk_mask(expected, regions), expected, regions)
    rel_err = ((got - expected).norm() / expected.norm()).item()
    rec.record(case, "sparta", ms, dense_ms, mib, HEADS, tokens, rel_err=float(f"{rel_err:.3g}"),
               speedup_vs_torch=round(torch_ms / ms, 1), config=list(TUNED_CONFIGS[HEAD_DIM]), **agreement)


def _torch_sums(q, k, starts):
    """The torch path's block sums (attention_block_mass divides them by the block sizes)."""
    return selection._block_mass_torch(q, k, BLOCK, BLOCK, None, starts, 1 << 28)


def bench_causal(rec, tune):
    tokens = LENGTHS[-1]
    q, k, v = inputs(tokens, HEADS)
    case = f"mass-causal-n{tokens}"
    _, dense_ms, dense_mib = measure(lambda: cudnn(q, k, v, causal=True))
    rec.record(case, "cudnn", dense_ms, dense_ms, dense_mib, HEADS, tokens, causal=True)
    _, ms, mib = measure(lambda: block_mass(q, k, BLOCK, BLOCK, causal=True))
    rec.record(case, "sparta", ms, dense_ms, mib, HEADS, tokens, causal=True, config=list(TUNED_CONFIGS[HEAD_DIM]))
    if not tune:
        return
    starts = [lo for lo, _ in regions_of(tokens)]
    dense = {True: dense_ms, False: measure(lambda: cudnn(q, k, v))[1]}
    for config in CANDIDATE_CONFIGS[HEAD_DIM]:
        for causal in (False, True):
            _, ms, mib = measure(lambda: block_mass(q, k, BLOCK, BLOCK, causal=causal,
                                                    region_starts=(0,) if causal else starts, config=config))
            rec.record(f"mass-{'causal-' if causal else ''}n{tokens}", "sparta-config", ms, dense[causal], mib,
                       HEADS, tokens, causal=causal, config=list(config))


def bench_sparsed_select(rec):
    """patterns.py's SparseD switch step: 32 heads, 32k tokens, select on the kernel vs the torch path."""
    tokens, heads = patterns.DLM_TOKENS, patterns.DLM_HEADS
    q, k, v = inputs(tokens, heads)
    case = f"sparsed-select-dlm-{tokens}"
    _, dense_ms, dense_mib = measure(lambda: cudnn(q, k, v))
    rec.record(case, "cudnn", dense_ms, dense_ms, dense_mib, heads, tokens)
    schedule = SparseDSchedule(50, keep_ratio=KEEP, block=BLOCK, prompt_len=tokens - patterns.DLM_ANSWER)
    with torch_path():
        expected_mask, torch_ms, torch_mib = measure(lambda: schedule.select(q, k).mask, slow=True)
        expected_mass = attention_block_mass(q, k, BLOCK, BLOCK, region_starts=[lo for lo, _ in regions_of(tokens)])
    rec.record(case, "torch", torch_ms, dense_ms, torch_mib, heads, tokens)
    mask, ms, mib = measure(lambda: schedule.select(q, k).mask)
    agreement = selection_agreement(mask, expected_mask, expected_mass, regions_of(tokens))
    rec.record(case, "sparta", ms, dense_ms, mib, heads, tokens, speedup_vs_torch=round(torch_ms / ms, 1),
               config=list(TUNED_CONFIGS[HEAD_DIM]), **agreement)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=harness.RESULTS,
                        help="directory for block_mass-<device>.jsonl (default benchmarks/results)")
    parser.add_argument("--tune", action="store_true", help="also time every candidate launch config at 32k")
    args = parser.parse_args()
    out = args.results / harness.results_path("block_mass").name
    started = time.monotonic()
    rec = Recorder(out)
    for tokens in LENGTHS:
        harness.keep_going(bench_mass, rec, tokens)
    harness.keep_going(bench_causal, rec, args.tune)
    harness.keep_going(bench_sparsed_select, rec)
    print(f"records appended to {out}; {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
