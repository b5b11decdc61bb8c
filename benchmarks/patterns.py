"""Attention-pattern benchmark: dense cuDNN SDPA vs FlexAttention vs sparta's block-sparse kernel.

One GPU, bf16, forward (the sampling loop of a video DiT / diffusion LM), attention only:
- video DiT: 13 x 30 x 52 latent grid = 20,280 tokens, 24 heads, head dim 128. Each pattern family
  (diagonal, multi-diagonal, temporal, spatial, stripe, 3-D tiles in tile-major order, the same tiles
  in raster order) at block densities near 0.05 / 0.15 / 0.30; FlexAttention with the same block
  mask at the middle density. These sparta times over dense cuDNN's are the search's cost model:
  written to attention/pattern_costs.json (--costs).
- a searched plan: Sparse-vDiT search on 2 calibration samples, lam swept down until the calibration
  error is <= 4.5%, timed and checked on a third sample (--plan writes the YAML).
- diffusion LM: 32,768 tokens (last 1,024 the answer), 32 heads, head dim 128: SparseD's mask (keep
  0.3, block 128) selected at the switch step and reused on a later step's q, k, v.

q, k, v are synthetic with planted head structure (no model weights here): local 3-D neighbourhoods,
temporal, per-frame, sink, near-uniform and content-clustered heads for video; local, sink, topic
(retrieval) and near-uniform heads for the dLM. rel_err = |o - o_dense| / |o_dense| over all heads.
tflops counts the FLOPs the kernel computes (4 D per attended block-pair element); speedup is dense
cuDNN's time over the case's, measured in the same run.

    python benchmarks/patterns.py [--out benchmarks/results/patterns-<device>.jsonl]
                                  [--costs attention/pattern_costs.json] [--plan PATH]
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sparta.attention import (
    CostModel,
    HeadGroup,
    Pattern,
    PatternSearch,
    SparseDSchedule,
    VideoGrid,
    attend,
    calibration_error,
    invert_permutation,
    video_candidates,
)

import harness

DEVICE = "cuda"
VIDEO = VideoGrid(13, 30, 52)
HEAD_DIM, BLOCK = 128, 128
DLM_TOKENS, DLM_ANSWER, DLM_HEADS = 32768, 1024, 32
TARGET_DENSITIES = (0.05, 0.15, 0.30)

# Video heads: (kind, parameters); lengths are RBF length scales in (frames, rows, columns).
VIDEO_HEADS = (
    [("local", dict(lengths=(0.7, 1.5, 1.5), beta=12.0))] * 3
    + [("local", dict(lengths=(1.0, 3.0, 3.0), beta=12.0))] * 3
    + [("local", dict(lengths=(0.5, 2.0, 4.0), beta=10.0))] * 2
    + [("local", dict(lengths=(math.inf, 1.0, 1.0), beta=12.0))] * 4  # temporal: same place, any frame
    + [("local", dict(lengths=(0.3, math.inf, math.inf), beta=10.0))] * 3  # spatial: the own frame
    + [("sink", dict(beta=8.0, sinks=VIDEO.frame_size))] * 3  # the first frame
    + [("uniform", dict())] * 3
    + [("clusters", dict(clusters=16, beta=10.0))] * 3
)
# dLM heads; lengths in tokens.
DLM_HEADS_SPEC = (
    [("local", dict(lengths=(16.0,), beta=12.0))] * 6
    + [("local", dict(lengths=(128.0,), beta=12.0))] * 6
    + [("sink", dict(beta=8.0, sinks=1024))] * 6
    + [("topics", dict(topics=32, beta=10.0))] * 10
    + [("uniform", dict())] * 4
)


def synthetic_qkv(positions: torch.Tensor, heads, seed: int, dtype=torch.bfloat16):
    """q, k, v [1, H, N, HEAD_DIM] whose attention has each head's planted structure.

    The structure of a head is fixed (seeded by its index); `seed` draws the sample: noise on q and
    k, and the values. Logits are q.k / sqrt(D): "local" heads get beta * exp(-|dx / length|^2 / 2)
    through random Fourier features of the positions, "sink" heads beta on the first `sinks` tokens,
    "clusters" / "topics" beta between tokens of one random cluster (video: scattered tokens; dLM:
    random segments of 256-1024 tokens), "uniform" heads nothing but the noise.
    """
    sample = torch.Generator(device=DEVICE).manual_seed(seed)
    tokens, dims = positions.shape
    amplitude = lambda beta: math.sqrt(beta * math.sqrt(HEAD_DIM))  # noqa: E731 - logit = beta * (u.u')
    qs, ks, vs = [], [], []
    for index, (kind, p) in enumerate(heads):
        fixed = torch.Generator(device=DEVICE).manual_seed(1000 + index)
        if kind == "local":
            lengths = torch.tensor(p["lengths"], device=DEVICE)
            omega = torch.randn(dims, HEAD_DIM // 2, device=DEVICE, generator=fixed) / lengths[:, None]
            phase = positions @ omega
            q = k = amplitude(p["beta"]) * torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(HEAD_DIM // 2)
        elif kind == "sink":
            direction = F.normalize(torch.randn(HEAD_DIM, device=DEVICE, generator=fixed), dim=0)
            sinks = (torch.arange(tokens, device=DEVICE) < p["sinks"]).float()
            q = amplitude(p["beta"]) * direction.expand(tokens, -1)
            k = amplitude(p["beta"]) * sinks[:, None] * direction
        elif kind in ("clusters", "topics"):
            count = p.get("clusters") or p["topics"]
            if kind == "clusters":
                cluster = torch.randint(count, (tokens,), device=DEVICE, generator=fixed)
            else:
                lengths = torch.randint(256, 1025, (tokens // 256 + 1,), device=DEVICE, generator=fixed)
                segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=DEVICE), lengths)[:tokens]
                cluster = torch.randint(count, (lengths.numel(),), device=DEVICE, generator=fixed)[segment]
            embedding = F.normalize(torch.randn(count, HEAD_DIM, device=DEVICE, generator=fixed), dim=-1)
            q = k = amplitude(p["beta"]) * embedding[cluster]
        else:
            q = k = torch.zeros(tokens, HEAD_DIM, device=DEVICE)
        qs.append(q + 0.3 * torch.randn(tokens, HEAD_DIM, device=DEVICE, generator=sample))
        ks.append(k + 0.3 * torch.randn(tokens, HEAD_DIM, device=DEVICE, generator=sample))
        mean = 0.1 * torch.randn(HEAD_DIM, device=DEVICE, generator=fixed)
        vs.append(mean + torch.randn(tokens, HEAD_DIM, device=DEVICE, generator=sample))
    return tuple(torch.stack(x)[None].to(dtype) for x in (qs, ks, vs))


def video_positions():
    return torch.stack(VIDEO.coords(DEVICE), dim=-1).float()


def dlm_positions():
    return torch.arange(DLM_TOKENS, device=DEVICE, dtype=torch.float32)[:, None]


# ---- timing and records --------------------------------------------------------------------------

def median_ms(fn, rep_ms=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def relative_error(out, dense):
    return ((out.float() - dense.float()).norm() / dense.float().norm()).item()


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


class Recorder:
    def __init__(self, out_path: Path):
        self.out_path = out_path
        self.common = harness.metadata("patterns")

    def record(self, case, impl, ms, density, dense_ms, rel_err, heads, tokens, **extra):
        flops = 4 * heads * tokens * tokens * HEAD_DIM * density
        line = {**self.common, "case": case, "impl": impl, "pass": "fwd", "ms": round(ms, 4),
                "tflops": round(flops / ms / 1e9, 1), "speedup": round(dense_ms / ms, 3),
                "rel_err": None if rel_err is None else round(rel_err, 5), "density": round(density, 4), **extra}
        print(f"{case:34s} {impl:7s} {ms:8.3f} ms {line['tflops']:6.1f} TFLOP/s  x{line['speedup']:<6} "
              f"rel_err {line['rel_err']}  " + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        harness.append(self.out_path, line)


# ---- FlexAttention on the same block layout ------------------------------------------------------

_flex = None


def flex_attend(q, k, v, layout):
    """FlexAttention with the layout's blocks as full blocks, in the layout's token order."""
    global _flex
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    kernel = layout.to_kernel()
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(kernel.kv_count), kernel.kv_index, kernel.kv_count,
                                          kernel.kv_index, BLOCK_SIZE=(layout.block_q, layout.block_k),
                                          seq_lengths=(layout.seqlen_q, layout.seqlen_k))
    if layout.order is None:
        return lambda: _flex(q, k, v, block_mask=block_mask)
    order = layout.order.permutation(q.device)
    inverse = invert_permutation(order)

    def run():
        out = _flex(*(x.index_select(2, order) for x in (q, k, v)), block_mask=block_mask)
        return out.index_select(2, inverse)
    return run


# ---- video: patterns and the cost table ----------------------------------------------------------

def family_sweeps():
    """Per pattern family, parameter settings spanning low to moderate densities."""
    windows = [(f, h, w) for f in range(1, 14, 2) for h in range(1, 5) for w in range(1, 5)]
    return {
        "diagonal": [Pattern.of("diagonal", width=64 * i) for i in range(1, 161)],
        "multi_diagonal": [Pattern.of("multi_diagonal", width=8 * i, frame_radius=1) for i in range(1, 101)],
        "temporal": [Pattern.of("temporal", width=4 * i) for i in range(1, 151)],
        "spatial": [Pattern.of("spatial", frame_radius=r) for r in range(13)],
        "stripe": [Pattern.of("stripe", keys=((0, BLOCK * n),)) for n in range(1, VIDEO.tokens // BLOCK + 1)],
        "tiles": [Pattern.of("tiles", tile=(1, 8, 16), window=w) for w in windows],
    }


def bench_video_patterns(rec, costs_path):
    q, k, v = synthetic_qkv(video_positions(), VIDEO_HEADS, seed=3)
    heads, tokens = q.shape[1], q.shape[2]
    dense = cudnn(q, k, v)
    dense_ms = median_ms(lambda: cudnn(q, k, v))
    rec.record(f"dense-video-{tokens}", "cudnn", dense_ms, 1.0, dense_ms, None, heads, tokens)
    all_heads = tuple(range(heads))

    def run_sparta(case, layout):
        groups = [HeadGroup(all_heads, layout.repeat_heads(heads))]
        out = attend(q, k, v, groups)
        ms = median_ms(lambda: attend(q, k, v, groups))
        density = layout.density().item()
        rec.record(case, "sparta", ms, density, dense_ms, relative_error(out, dense), heads, tokens)
        return density, ms, groups[0].layout

    full = Pattern.of("full").build(VIDEO, device=DEVICE)
    _, full_ms, _ = run_sparta(f"full-1.00-video-{tokens}", full)
    table, matched = {}, {}
    for family, sweep in family_sweeps().items():
        built = [(p, p.build(VIDEO, device=DEVICE)) for p in sweep]
        points = []
        for target in TARGET_DENSITIES:
            pattern, layout = min(built, key=lambda b: abs(b[1].density().item() - target))
            density, ms, layout = run_sparta(f"{family}-{target:.2f}-video-{tokens}", layout)
            points.append([round(density, 4), round(ms / dense_ms, 4)])
            if target == TARGET_DENSITIES[1]:
                matched[family] = layout
                if family == "tiles":  # the same window without the reorder: why tile-major order matters
                    raster = Pattern.of("tiles", **{**dict(pattern.params), "reorder": False})
                    run_sparta(f"tiles_raster-{target:.2f}-video-{tokens}", raster.build(VIDEO, device=DEVICE))
        table[family] = points + [[1.0, round(full_ms / dense_ms, 4)]]
    table["full"] = [[1.0, round(full_ms / dense_ms, 4)]]  # plans run full heads in the kernel too
    costs = {**harness.metadata("pattern_costs"),
             "shape": {"grid": [VIDEO.frames, VIDEO.height, VIDEO.width], "heads": heads, "head_dim": HEAD_DIM,
                       "dtype": "bfloat16", "block": BLOCK, "pass": "fwd"},
             "dense_cudnn_ms": round(dense_ms, 4), "relative_time": table}
    costs_path.write_text(json.dumps(costs, indent=1) + "\n")
    print(f"cost table written to {costs_path}", flush=True)
    return dense_ms, matched


def bench_video_flex(rec, dense_ms, matched):
    q, k, v = synthetic_qkv(video_positions(), VIDEO_HEADS, seed=3)
    heads, tokens = q.shape[1], q.shape[2]
    dense = cudnn(q, k, v)
    for family, layout in matched.items():
        run = flex_attend(q, k, v, layout)
        out = run()
        rec.record(f"{family}-{TARGET_DENSITIES[1]:.2f}-video-{tokens}", "flex", median_ms(run),
                   layout.density().mean().item(), dense_ms, relative_error(out, dense), heads, tokens)


def bench_video_plan(rec, dense_ms, costs_path, plan_path):
    search = PatternSearch(VIDEO, video_candidates(VIDEO, block=BLOCK), block=BLOCK,
                           cost_model=CostModel.load(costs_path), stripe_blocks=(1, 4, 8))
    for seed in (1, 2):  # calibration samples
        search.observe(0, *synthetic_qkv(video_positions(), VIDEO_HEADS, seed=seed))
    plan, lam = search.plan_within(0.045)
    stats, calibration_err = plan.stats[0], calibration_error(plan)
    plan.save(plan_path)
    q, k, v = synthetic_qkv(video_positions(), VIDEO_HEADS, seed=3)
    heads, tokens = q.shape[1], q.shape[2]
    groups = plan(q, k, 0)
    out = attend(q, k, v, groups)
    ms = median_ms(lambda: attend(q, k, v, groups))
    density = sum(s["density"] for s in stats) / len(stats)
    mix = {}
    for pattern in plan.layers[0]:
        mix[pattern.name] = mix.get(pattern.name, 0) + 1
    rec.record(f"plan-video-{tokens}", "sparta", ms, density, dense_ms, relative_error(out, cudnn(q, k, v)), heads,
               tokens, lam=round(lam, 5), calibration_rel_err=round(calibration_err, 4), groups=len(groups),
               predicted_cost=round(sum(s["cost"] for s in stats) / len(stats), 4), plan=mix)


# ---- diffusion LM: SparseD ------------------------------------------------------------------------

def bench_dlm(rec):
    """Dense cuDNN vs sparta on SparseD's mask; returns what the FlexAttention section needs."""
    positions = dlm_positions()
    schedule = SparseDSchedule(50, keep_ratio=0.3, block=BLOCK, prompt_len=DLM_TOKENS - DLM_ANSWER)
    schedule.step = schedule.switch_step
    q, k, v = synthetic_qkv(positions, DLM_HEADS_SPEC, seed=1)  # the switch step
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    (group,) = schedule(q, k, 0)
    end.record()
    torch.cuda.synchronize()
    select_ms = start.elapsed_time(end)
    del q, k, v
    q, k, v = synthetic_qkv(positions, DLM_HEADS_SPEC, seed=2)  # a later step reuses the mask
    heads, tokens = q.shape[1], q.shape[2]
    dense = cudnn(q, k, v)
    dense_ms = median_ms(lambda: cudnn(q, k, v))
    rec.record(f"dense-dlm-{tokens}", "cudnn", dense_ms, 1.0, dense_ms, None, heads, tokens)
    out = attend(q, k, v, [group])
    rec.record(f"sparsed-0.30-dlm-{tokens}", "sparta", median_ms(lambda: attend(q, k, v, [group])),
               group.layout.density().mean().item(), dense_ms, relative_error(out, dense), heads, tokens,
               select_ms=round(select_ms, 2))
    return (q, k, v), group.layout, dense, dense_ms


def bench_dlm_flex(rec, qkv, layout, dense, dense_ms):
    q = qkv[0]
    run = flex_attend(*qkv, layout)
    rec.record(f"sparsed-0.30-dlm-{q.shape[2]}", "flex", median_ms(run), layout.density().mean().item(), dense_ms,
               relative_error(run(), dense), q.shape[1], q.shape[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--costs", type=Path, default=Path(__file__).parents[1] / "attention" / "pattern_costs.json")
    parser.add_argument("--plan", type=Path, default=Path("plan-video.yaml"))
    parser.add_argument("--skip-flex-after-s", type=float, default=150.0,
                        help="leave FlexAttention (slow to compile) out once this much time has passed")
    args = parser.parse_args()
    out = args.out or harness.results_path("patterns")
    started = time.monotonic()
    rec = Recorder(out)
    dense_ms, matched = harness.keep_going(bench_video_patterns, rec, args.costs) or (None, {})
    if dense_ms is not None:
        harness.keep_going(bench_video_plan, rec, dense_ms, args.costs, args.plan)
    dlm = harness.keep_going(bench_dlm, rec)
    flex_in_time = lambda: time.monotonic() - started < args.skip_flex_after_s  # noqa: E731
    if dense_ms is not None and flex_in_time():
        harness.keep_going(bench_video_flex, rec, dense_ms, matched)
    if dlm is not None and flex_in_time():
        harness.keep_going(bench_dlm_flex, rec, *dlm)
    print(f"records appended to {out}; {time.monotonic() - started:.0f} s; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
