"""Block-sparse attention: sparta's Triton kernels against the kernels a user would otherwise pick.

Measures in one run (bf16, B=1, H=16; N=16384 D=128 and N=32768 D=64):
- dense (every block): sparta vs cuDNN SDPA, FlashAttention-2 SDPA, FlexAttention;
- block-sparse at densities 0.5 / 0.25 / 0.1, random 128-blocks + diagonal ("sparse-") and a video
  pattern ("video-": local window / multi-diagonal / vertical-stripe heads): sparta vs FlexAttention
  given the identical block mask (as full blocks), and vs sparta dense;
- forward and forward+backward (forward of a training step: inputs require grad), and the time to
  build the layout (wall time of build_kernel_layout on an idle GPU: its CPU launch cost included).
Times are triton.testing.do_bench medians (L2 flushed before each run).
TFLOP/s count the computed blocks only: 4*D flops per (query, key) pair forward, 3.5x that for
forward+backward. Appends one JSON line per measurement to benchmarks/results/attention-<device>.jsonl.

    python benchmarks/attention.py [--tune] [--out results.jsonl]

--tune first times every candidate tile config of each pass (dense, per head dim), prints the
table and uses the fastest for the rest of the run (the kernels' TUNED_CONFIGS come from it).
"""

import argparse
import importlib
import json
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sparta.kernels import block_sparse_attention, build_kernel_layout

import harness

attention_module = importlib.import_module("sparta.kernels.block_sparse_attention")

SHAPES = [(16384, 128), (32768, 64)]  # (N, D) with B=1, H=16
HEADS = 16
BLOCK = 128
DENSITIES = [0.5, 0.25, 0.1]
TOKENS_PER_FRAME = 1024  # video pattern: tile-major frames of 8 blocks (N=16k: 16 frames)


def random_diagonal_mask(num_blocks: int, density: float, seed: int) -> torch.Tensor:
    """Random 128-blocks with probability p plus the diagonal, p chosen so the density is `density`."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    p = (density * num_blocks - 1) / (num_blocks - 1)
    mask = torch.rand(1, HEADS, num_blocks, num_blocks, device="cuda", generator=gen) < p
    return mask | torch.eye(num_blocks, dtype=torch.bool, device="cuda")


def video_mask(num_blocks: int, density: float) -> torch.Tensor:
    """Sparse-vDiT-like heads on a (frames, blocks per frame) grid, each as close to `density` as its
    parameters allow: local window |i-j| <= a; multi-diagonal (spatial neighbours within a, frames
    within b); vertical stripe (a global key blocks plus the band |i-j| <= 1)."""
    per_frame = TOKENS_PER_FRAME // BLOCK
    i = torch.arange(num_blocks, device="cuda")[:, None]
    j = torch.arange(num_blocks, device="cuda")[None, :]
    same_spot, frame_gap = (i % per_frame - j % per_frame).abs(), (i // per_frame - j // per_frame).abs()
    families = [
        [(i - j).abs() <= a for a in range(num_blocks)],
        [(same_spot <= a) & (frame_gap <= b) for a in range(per_frame) for b in range(-(-num_blocks // per_frame))],
        [(j < a) | ((i - j).abs() <= 1) for a in range(num_blocks)],
    ]
    heads = []
    for h in range(HEADS):
        candidates = families[h % len(families)]
        heads.append(min(candidates, key=lambda m: abs(m.float().mean().item() - density)))
    return torch.stack(heads)[None]


def flex_block_mask(layout, seqlen: int) -> BlockMask:
    """FlexAttention's BlockMask with exactly the layout's blocks, all full (none needs a mask_mod)."""
    return BlockMask.from_kv_blocks(torch.zeros_like(layout.kv_count), layout.kv_index,
                                    layout.kv_full_count, layout.kv_index, BLOCK_SIZE=BLOCK,
                                    seq_lengths=(seqlen, seqlen))


def time_ms(fn, grads=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def time_passes(attention, q, k, v):
    """(forward ms, forward+backward ms) of o = attention(q, k, v)."""
    d_o = torch.randn_like(q)
    fwd = time_ms(lambda: attention(q, k, v))
    fwd_bwd = time_ms(lambda: attention(q, k, v).backward(d_o), grads=[q, k, v])
    return fwd, fwd_bwd


def tune(q, k, v, layout, head_dim: int) -> None:
    """Time every candidate config of each kernel, print them, make the fastest the default."""
    problem = attention_module._Problem(BLOCK, BLOCK, q.shape[2], k.shape[2], False, False)
    lists = (layout.kv_count, layout.kv_full_count, layout.kv_index, layout.q_block_order)
    transposed = (layout.q_count, layout.q_full_count, layout.q_index)
    scale = head_dim ** -0.5
    q, k, v = (x.detach() for x in (q, k, v))
    o, lse = attention_module._forward(q, k, v, *lists, None, None, problem, scale)
    d_o, d_lse = torch.randn_like(o), torch.zeros_like(lse)
    runs = {
        "fwd": lambda c: attention_module._forward(q, k, v, *lists, None, None, problem, scale, config=c),
        "bwd": lambda c: attention_module._backward(d_o, d_lse, q, k, v, o, lse, *lists, *transposed, None, None,
                                                    problem, scale, config=c),
    }
    for kind, run in runs.items():
        times = {c: time_ms(lambda c=c: run(c)) for c in attention_module.CANDIDATE_CONFIGS[(kind, head_dim)]}
        for config, ms in sorted(times.items(), key=lambda item: item[1]):
            print(f"tune {kind:5s} D{head_dim}: {ms:8.3f} ms  {config}")
        attention_module.TUNED_CONFIGS[(kind, head_dim)] = min(times, key=times.get)


def run_shape(seqlen: int, head_dim: int, do_tune: bool, record) -> None:
    torch.manual_seed(0)
    make = lambda: torch.randn(1, HEADS, seqlen, head_dim, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                               requires_grad=True)
    q, k, v = make(), make(), make()
    num_blocks = seqlen // BLOCK
    dense_mask = torch.ones(1, HEADS, num_blocks, num_blocks, dtype=torch.bool, device="cuda")
    dense_layout = build_kernel_layout(dense_mask, BLOCK, BLOCK, seqlen_q=seqlen, seqlen_k=seqlen)
    if do_tune:
        tune(q, k, v, dense_layout, head_dim)
    flex = torch.compile(flex_attention, dynamic=False)
    dense_pairs = HEADS * seqlen * seqlen
    tag = f"d{head_dim}-n{seqlen}"

    def sdpa(backend):
        def attention(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attention

    dense_flex_mask = flex_block_mask(dense_layout, seqlen)
    dense = {
        "sparta": time_passes(lambda q, k, v: block_sparse_attention(q, k, v, dense_layout), q, k, v),
        "cudnn": time_passes(sdpa(SDPBackend.CUDNN_ATTENTION), q, k, v),
        "fa2": time_passes(sdpa(SDPBackend.FLASH_ATTENTION), q, k, v),
        "flex": time_passes(lambda q, k, v: flex(q, k, v, block_mask=dense_flex_mask), q, k, v),
    }
    dense_fwd_ms = dense["sparta"][0]
    for impl, (fwd, fwd_bwd) in dense.items():
        for pass_name, ms, i in (("fwd", fwd, 0), ("fwd+bwd", fwd_bwd, 1)):
            extra = {}
            if impl == "sparta":
                extra = {f"speedup_vs_{other}": round(dense[other][i] / ms, 3) for other in ("cudnn", "fa2", "flex")}
            record(f"dense-{tag}", impl, pass_name, ms, dense_pairs, head_dim, density=1.0, **extra)

    build = lambda mask: build_kernel_layout(mask, BLOCK, BLOCK, seqlen_q=seqlen, seqlen_k=seqlen)  # noqa: E731
    for density in DENSITIES:
        for family, mask in (("sparse", random_diagonal_mask(num_blocks, density, seed=int(density * 100))),
                             ("video", video_mask(num_blocks, density))):
            case = f"{family}-{density:.2f}-{tag}"
            layout = build(mask)
            pairs = int(layout.kv_count.sum()) * BLOCK * BLOCK
            actual = round(pairs / dense_pairs, 4)
            block_mask = flex_block_mask(layout, seqlen)
            with torch.no_grad():  # the same mask: both compute the same numbers
                ours = block_sparse_attention(q, k, v, layout)
                theirs = flex(q, k, v, block_mask=block_mask)
                rel = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
            if rel > 2e-2:
                print(f"WARNING {case}: sparta and FlexAttention differ by {rel:.2e}", flush=True)
            ours_t = time_passes(lambda q, k, v: block_sparse_attention(q, k, v, layout), q, k, v)
            flex_t = time_passes(lambda q, k, v: flex(q, k, v, block_mask=block_mask), q, k, v)
            # Scaling targets: forward time <= rho/0.85 of sparta dense; backward alone <= rho/0.75.
            dense_fwd, dense_fwd_bwd = dense["sparta"]
            scaling = (dict(time_vs_sparta_dense=round(ours_t[0] / dense_fwd, 4), target=round(actual / 0.85, 4)),
                       dict(bwd_time_vs_sparta_dense=round((ours_t[1] - ours_t[0]) / (dense_fwd_bwd - dense_fwd), 4),
                            target=round(actual / 0.75, 4)))
            for i, pass_name in enumerate(("fwd", "fwd+bwd")):
                record(case, "sparta", pass_name, ours_t[i], pairs, head_dim, density=actual,
                       speedup_vs_flex=round(flex_t[i] / ours_t[i], 3), rel_diff_vs_flex=float(f"{rel:.2e}"),
                       **scaling[i])
                record(case, "flex", pass_name, flex_t[i], pairs, head_dim, density=actual)
            layout_ms = time_ms(lambda: build(mask))
            record(case, "sparta", "layout", layout_ms, None, head_dim, density=actual,
                   fraction_of_dense_fwd=round(layout_ms / dense_fwd_ms, 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="sweep the candidate tile configs first")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    out = args.out or harness.results_path("attention")
    common = dict(harness.metadata("attention"), dtype="bfloat16", batch=1, heads=HEADS, block=BLOCK)

    def record(case, impl, pass_name, ms, pairs, head_dim, **fields):
        flops = None if pairs is None else 4 * head_dim * pairs * (3.5 if pass_name == "fwd+bwd" else 1.0)
        line = dict(common, case=case, impl=impl, **{"pass": pass_name}, ms=round(ms, 4),
                    tflops=None if flops is None else round(flops / ms / 1e9, 1), head_dim=head_dim, **fields)
        print(json.dumps(line), flush=True)
        harness.append(out, line)

    for seqlen, head_dim in SHAPES:
        run_shape(seqlen, head_dim, args.tune, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
