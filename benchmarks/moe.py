"""MoE layer benchmark: sparta vs a Python loop over experts vs a straightforward torch._grouped_mm layer.

One run on one GPU, bf16, T = 16384 tokens, d_model = 2048:
- top-k layers E64 top-8 d_ff 1024 and E8 top-2 d_ff 8192 (SwiGLU), forward and forward+backward,
  for the three implementations (same router, same weights, same tokens);
- MoE++ (64 FFN + 64 zero-computation experts, tau 0.75) vs the vanilla E64 top-8 layer;
- BlockFFN (64 SiLU experts, d_ff 1024) at several activation rates: layer time vs measured TLS;
- `torch.compile(MoE, fullgraph=True)` vs the eager layer (E64 top-8 and BlockFFN at rate 0.125), with
  the compilation time and the recompilations over the timed calls.
TFLOP/s count the FFN expert FLOPs actually computed: 2 * rows * d_model * (H + d_ff) per forward
(H = 2 d_ff for SwiGLU), three times that for forward+backward; rows = routed (token, expert) pairs.

    python benchmarks/moe.py [--out benchmarks/results/moe-<device>.jsonl] [--profile] [--only blockffn ...]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch._dynamo.utils import counters

from sparta.moe import MoE, MoEConfig
from sparta.moe.dispatch import build_plan, build_plan_from_mask, run_local

import harness

DEVICE = "cuda"
TOKENS, D_MODEL = 16384, 2048
TOPK_CASES = [(64, 8, 1024), (8, 2, 8192)]  # (experts, top_k, d_ff)
SECTIONS = ("topk", "moepp", "blockffn", "compile")


def topk_route(x, router_weight, top_k):
    probs = F.linear(x.float(), router_weight.float()).softmax(-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def loop_layer(x, router_weight, w_in, w_out, top_k):
    """The Mixtral/HF way: one masked gather, two matmuls and an index_add per expert."""
    weights, experts = topk_route(x, router_weight, top_k)
    out = torch.zeros_like(x)
    for e in range(w_in.shape[0]):
        token, slot = torch.where(experts == e)
        gate, up = (x[token] @ w_in[e].t()).chunk(2, dim=-1)
        expert_out = (F.silu(gate) * up) @ w_out[e].t()
        out = out.index_add(0, token, expert_out * weights[token, slot, None].to(x.dtype))
    return out


def grouped_mm_layer(x, router_weight, w_in, w_out, top_k):
    """Sort by expert, two torch._grouped_mm, SwiGLU in torch ops, weighted index_add back."""
    weights, experts = topk_route(x, router_weight, top_k)
    order = experts.flatten().argsort(stable=True)
    token = order // top_k
    offs = torch.bincount(experts.flatten(), minlength=w_in.shape[0]).cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x[token], w_in.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    expert_out = torch._grouped_mm(F.silu(gate) * up, w_out.transpose(1, 2), offs=offs)
    expert_out = expert_out * weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, expert_out)


def median_ms(fn, rep_ms):
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")


def timed_passes(forward, inputs, rep_ms):
    """(fwd ms, fwd+bwd ms) of `forward() -> (output, *scalar losses)`; the backward goes through
    torch.autograd.grad, so no .grad accumulates between repetitions."""
    outputs = forward()
    grad_outputs = [torch.randn_like(outputs[0])] + [torch.ones_like(loss) for loss in outputs[1:]]

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        torch.autograd.grad(forward(), inputs, grad_outputs, allow_unused=True)

    return median_ms(fwd, rep_ms), median_ms(fwd_bwd, rep_ms)


def ffn_tflops(rows, d_ff, ms, backward):
    flops = 2 * rows * D_MODEL * 3 * d_ff * (3 if backward else 1)  # SwiGLU: 2*d_ff in, d_ff out
    return flops / ms / 1e9


class Recorder:
    def __init__(self, out_path):
        self.out_path = out_path
        self.common = harness.metadata("moe")

    def record(self, case, impl, pass_, ms, tflops, **extra):
        line = {**self.common, "case": case, "impl": impl, "pass": pass_, "ms": round(ms, 4),
                "tflops": round(tflops, 1), **extra}
        print(f"{case:46s} {impl:10s} {pass_:8s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s "
              + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        harness.append(self.out_path, line)


def make_layer(config):
    layer = MoE(D_MODEL, config).to(DEVICE)
    layer.experts.bfloat16()  # the router (and MoE++'s tiny zero-computation experts) stay fp32
    return layer


def layer_loss_pair(layer, x, **kwargs):
    """(output, aux loss) of a sparta layer: what a training step backpropagates through."""
    y, aux = layer(x, **kwargs)
    return y, aux.loss


def bench_topk_case(rec, experts, top_k, d_ff, profile):
    """Returns sparta's (fwd ms, fwd+bwd ms)."""
    case = f"E{experts}-top{top_k}-f{d_ff}-d{D_MODEL}-T{TOKENS}"
    layer = make_layer(MoEConfig(router="topk", num_experts=experts, top_k=top_k, d_ff=d_ff))
    x = torch.randn(1, TOKENS, D_MODEL, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w_in, w_out, router_weight = layer.experts.w_in, layer.experts.w_out, layer.router.weight
    impls = {
        "sparta": lambda: layer_loss_pair(layer, x),
        "grouped_mm": lambda: (grouped_mm_layer(x[0], router_weight, w_in, w_out, top_k),),
        "loop": lambda: (loop_layer(x[0], router_weight, w_in, w_out, top_k),),
    }
    with torch.no_grad():
        ref = grouped_mm_layer(x[0], router_weight, w_in, w_out, top_k).float()
        err = ((layer(x)[0][0].float() - ref).norm() / ref.norm()).item()
    print(f"{case}: sparta vs grouped_mm relative error {err:.2e}", flush=True)
    rows = TOKENS * top_k
    results = {impl: timed_passes(forward, [x, w_in, w_out, router_weight], rep_ms=300 if impl == "loop" else 500)
               for impl, forward in impls.items()}
    for impl, times in results.items():
        for index, pass_ in enumerate(("fwd", "fwd+bwd")):
            ms = times[index]
            extra = {"tokens": TOKENS, "num_experts": experts, "top_k": top_k, "d_ff": d_ff, "ffn_rows": rows}
            if impl == "sparta":
                extra["speedup_vs_grouped_mm"] = round(results["grouped_mm"][index] / ms, 3)
                extra["speedup_vs_loop"] = round(results["loop"][index] / ms, 3)
                extra["rel_err_vs_grouped_mm"] = float(f"{err:.2e}")
            rec.record(case, impl, pass_, ms, ffn_tflops(rows, d_ff, ms, pass_ == "fwd+bwd"), **extra)
    if profile:
        harness.keep_going(profile_layer, layer, x)
    return results["sparta"]


def bench_topk(rec, profile):
    vanilla_ms = {}
    for experts, top_k, d_ff in TOPK_CASES:
        vanilla_ms[(experts, top_k, d_ff)] = bench_topk_case(rec, experts, top_k, d_ff, profile and experts == 64)
        torch.cuda.empty_cache()
    return vanilla_ms


def expert_part(layer, tokens, routing):
    """FFN + zero-computation experts (dispatch included) for a fixed routing: what the MoE++ paper
    calls expert throughput."""
    plan = build_plan(routing.slot_expert, routing.slot_weight, layer.config.num_experts)
    y = run_local(tokens, plan, layer.experts)
    if layer.zero_computation is not None:
        y = y + layer.zero_computation(tokens, routing.slot_expert, routing.slot_weight)
    return (y,)


def bench_moepp(rec, vanilla_ms, profile):
    """MoE++ (64 FFN + 64 zero-computation experts, tau 0.75) vs the vanilla E64 top-8 layer, as a
    whole layer and for the expert part alone (fixed routing)."""
    experts, top_k, d_ff = TOPK_CASES[0]
    cfg = MoEConfig(router="moepp", num_experts=experts, top_k=top_k, d_ff=d_ff, tau=0.75,
                    num_zero_experts=experts // 4, num_copy_experts=experts // 4, num_constant_experts=experts // 2)
    layer = make_layer(cfg)
    vanilla = make_layer(MoEConfig(router="topk", num_experts=experts, top_k=top_k, d_ff=d_ff))
    x = torch.randn(1, TOKENS, D_MODEL, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    prev_logits = torch.randn(1, TOKENS, cfg.total_experts, device=DEVICE)
    with torch.no_grad():
        _, aux = layer(x, prev_router_logits=prev_logits)
        routing = layer.router(x[0], (1, TOKENS), prev_logits)
        vanilla_routing = vanilla.router(x[0], (1, TOKENS))
    per_token = aux.stats["ffn_experts_per_token"].item()
    rows = round(per_token * TOKENS)
    layer_ms = timed_passes(lambda: layer_loss_pair(layer, x, prev_router_logits=prev_logits),
                            [x] + list(layer.parameters()), rep_ms=500)
    experts_ms = timed_passes(lambda: expert_part(layer, x[0], routing), [x] + list(layer.parameters()), rep_ms=500)
    vanilla_experts_ms = timed_passes(lambda: expert_part(vanilla, x[0], vanilla_routing),
                                      [x] + list(vanilla.parameters()), rep_ms=500)
    case = f"moepp-E{experts}+{cfg.num_zero_computation_experts}zc-top{top_k}-f{d_ff}-d{D_MODEL}-T{TOKENS}-tau0.75"
    topk_case = f"E{experts}-top{top_k}-f{d_ff}-d{D_MODEL}-T{TOKENS}"
    routed = {"ffn_experts_per_token": round(per_token, 3),
              **{f"{kind}_fraction": round(aux.stats[f"{kind}_fraction"].item(), 3)
                 for kind in ("zero", "copy", "constant")}}
    for index, pass_ in enumerate(("fwd", "fwd+bwd")):
        backward = pass_ == "fwd+bwd"
        rec.record(case, "sparta", pass_, layer_ms[index], ffn_tflops(rows, d_ff, layer_ms[index], backward),
                   tokens=TOKENS, ffn_rows=rows, part="layer",
                   speedup_vs_topk=round(vanilla_ms[TOPK_CASES[0]][index] / layer_ms[index], 3), **routed)
        rec.record(case, "sparta", pass_, experts_ms[index], ffn_tflops(rows, d_ff, experts_ms[index], backward),
                   tokens=TOKENS, ffn_rows=rows, part="experts",
                   speedup_vs_topk=round(vanilla_experts_ms[index] / experts_ms[index], 3), **routed)
        rec.record(topk_case, "sparta", pass_, vanilla_experts_ms[index],
                   ffn_tflops(TOKENS * top_k, d_ff, vanilla_experts_ms[index], backward),
                   tokens=TOKENS, ffn_rows=TOKENS * top_k, part="experts")
    if profile:
        harness.keep_going(profile_layer, layer, x, prev_router_logits=prev_logits)


def bench_blockffn(rec, profile):
    """Activation rate set through a bias feature: x[:, -1] = 1 and router column -b, so that
    P(score > 0) = P(N(0, s^2) > b) is the target rate. profile: kernel table and stage times at the
    lowest rate, where the part of the layer that does not shrink with the rate weighs most."""
    experts, d_ff = 64, 1024
    layer = MoE(D_MODEL, MoEConfig(router="blockffn", num_experts=experts, d_ff=d_ff, activation="silu")).to(DEVICE)
    layer.experts.bfloat16()
    x = torch.randn(1, TOKENS, D_MODEL, device=DEVICE)
    x[..., -1] = 1.0
    x = x.bfloat16().requires_grad_()
    densities, fwd_bwd_times = [], []
    for rate in (0.5, 0.25, 0.125, 0.0625):
        set_blockffn_rate(layer, rate)
        with torch.no_grad():
            _, aux = layer(x)
        tls = aux.stats["tls"].item()
        rows = round(aux.stats["ffn_experts_per_token"].item() * TOKENS)
        fwd_ms, fwd_bwd_ms = timed_passes(lambda: layer_loss_pair(layer, x), [x] + list(layer.parameters()),
                                          rep_ms=400)
        case = f"blockffn-E{experts}-f{d_ff}-d{D_MODEL}-T{TOKENS}-rate{rate}"
        for pass_, ms in (("fwd", fwd_ms), ("fwd+bwd", fwd_bwd_ms)):
            flops_per_row = 2 * D_MODEL * 2 * d_ff * (3 if pass_ == "fwd+bwd" else 1)  # SiLU MLP: in + out
            rec.record(case, "sparta", pass_, ms, rows * flops_per_row / ms / 1e9, tokens=TOKENS, ffn_rows=rows,
                       tls=round(tls, 4), cls8=round(aux.stats["cls8"].item(), 4),
                       cls64=round(aux.stats["cls64"].item(), 4), ms_per_density=round(ms / (1 - tls), 3))
        densities.append(1 - tls)
        fwd_bwd_times.append(fwd_bwd_ms)
    print(describe_density_scaling(densities, fwd_bwd_times), flush=True)
    if profile:
        harness.keep_going(profile_layer, layer, x)
        harness.keep_going(profile_blockffn_stages, layer, x)


def set_blockffn_rate(layer, rate):
    """Bias the router (last feature of x is 1) so that a share `rate` of the scores is positive."""
    normal = torch.distributions.Normal(0.0, 1.0)
    spread = layer.router.weight[:, :-1].norm(dim=1).mean().item()
    with torch.no_grad():
        layer.router.weight[:, -1] = -spread * normal.icdf(torch.tensor(1.0 - rate)).item()


def bench_compile(rec):
    """The compiled layer against the eager one, same weights and tokens, fwd and fwd+bwd. Every timed
    call routes the same tokens; tests/gpu/test_moe_compile_gpu.py checks that new routing reuses the graph."""
    experts, top_k, d_ff = TOPK_CASES[0]
    cases = {
        f"E{experts}-top{top_k}-f{d_ff}-d{D_MODEL}-T{TOKENS}": MoEConfig(router="topk", num_experts=experts,
                                                                         top_k=top_k, d_ff=d_ff),
        f"blockffn-E{experts}-f{d_ff}-d{D_MODEL}-T{TOKENS}-rate0.125": MoEConfig(router="blockffn", num_experts=experts,
                                                                                 d_ff=d_ff),
    }
    for case, config in cases.items():
        layer = make_layer(config)
        x = torch.randn(1, TOKENS, D_MODEL, device=DEVICE)
        if config.router == "blockffn":
            x[..., -1] = 1.0
            set_blockffn_rate(layer, 0.125)
        x = x.bfloat16().requires_grad_()
        inputs = [x] + list(layer.parameters())
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(layer, fullgraph=True)
        start = time.perf_counter()
        for grad_mode in (True, False):  # the training graph and the no-grad one the fwd timing uses
            with torch.set_grad_enabled(grad_mode):
                y, aux = compiled(x)
            if grad_mode:
                torch.autograd.grad([y, aux.loss], inputs, [torch.randn_like(y), torch.ones_like(aux.loss)],
                                    allow_unused=True)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            _, aux = layer(x)
        rows = round(aux.stats["ffn_experts_per_token"].item() * TOKENS)
        eager_ms = timed_passes(lambda: layer_loss_pair(layer, x), inputs, rep_ms=500)
        compiled_ms = timed_passes(lambda: layer_loss_pair(compiled, x), inputs, rep_ms=500)
        recompiles = counters["stats"]["unique_graphs"] - graphs
        swiglu = config.activation == "swiglu"
        for index, pass_ in enumerate(("fwd", "fwd+bwd")):
            factor = 3 if pass_ == "fwd+bwd" else 1
            flops_per_row = 2 * D_MODEL * (3 if swiglu else 2) * d_ff * factor
            common = dict(tokens=TOKENS, ffn_rows=rows, tls=round(aux.stats["tls"].item(), 4))
            rec.record(case, "sparta", pass_, eager_ms[index], rows * flops_per_row / eager_ms[index] / 1e9,
                       part="layer", **common)
            rec.record(case, "sparta-compiled", pass_, compiled_ms[index],
                       rows * flops_per_row / compiled_ms[index] / 1e9, part="layer",
                       speedup_vs_eager=round(eager_ms[index] / compiled_ms[index], 3),
                       compile_s=round(compile_s, 1), recompiles=recompiles, **common)
        torch.cuda.empty_cache()


def describe_density_scaling(densities, times) -> str:
    """How BlockFFN fwd+bwd time follows the density 1 - TLS: the raw ms per unit density, and the
    least-squares fit ms = fixed + slope * density, whose fixed part (router, plan, launches) does not
    depend on the routing; what does should be proportional to the density."""
    def spread(values):
        return 100 * (max(values) - min(values)) / statistics.mean(values)

    raw = [ms / density for ms, density in zip(times, densities)]
    fit = statistics.linear_regression(densities, times)
    scaled = [(ms - fit.intercept) / density for ms, density in zip(times, densities)]
    r2 = statistics.correlation(densities, times) ** 2
    return (f"BlockFFN fwd+bwd ms / (1 - TLS): {[round(t, 2) for t in raw]} (spread {spread(raw):.0f}%); least squares "
            f"ms = {fit.intercept:.2f} + {fit.slope:.1f} * (1 - TLS), R^2 {r2:.5f}: the fixed part is "
            f"{100 * fit.intercept / (fit.intercept + fit.slope):.1f}% of a dense layer, and the rest per unit density "
            f"is {[round(t, 2) for t in scaled]} (spread {spread(scaled):.0f}%)")


def profile_layer(layer, x, **kwargs):
    """Kernel table of fwd+bwd passes, then per pass: wall time, time the GPU spent in kernels (and how
    many it ran), CPU time of the host thread and how much of it waited on the GPU (.item(), .tolist())."""
    grad_out = torch.randn_like(x)
    inputs = [x] + list(layer.parameters())

    def fwd_bwd():
        y, aux = layer(x, **kwargs)
        torch.autograd.grad([y, aux.loss], inputs, [grad_out, torch.ones_like(aux.loss)], allow_unused=True)

    wall_ms = median_ms(fwd_bwd, 200)
    passes = 3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(passes):
            fwd_bwd()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60), flush=True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / passes
    cpu_ms = sum(a.self_cpu_time_total for a in averages if a.device_type == torch.autograd.DeviceType.CPU) / 1e3 / passes
    waits = ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize")
    wait_ms = sum(a.self_cpu_time_total for a in averages if a.key in waits) / 1e3 / passes
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
    print(f"per fwd+bwd: wall {wall_ms:.3f} ms, GPU kernels {kernel_ms:.3f} ms ({len(kernels) / passes:.0f} kernels), "
          f"CPU {cpu_ms:.3f} ms (profiled) of which {wait_ms:.3f} ms waiting for the GPU ({', '.join(waits)})",
          flush=True)


def profile_blockffn_stages(layer, x):
    """Forward time of each stage of the BlockFFN layer (no grad), to place the floor outside the experts."""
    tokens, batch_shape = x[0], (1, x.shape[1])
    with torch.no_grad():
        routing = layer.router(tokens, batch_shape)
        active = routing.active
        plan = build_plan_from_mask(active, routing.slot_weight)
        stages = {
            "router + losses": lambda: layer.router(tokens, batch_shape),
            "routing plan": lambda: build_plan_from_mask(active, routing.slot_weight),
            "experts (permute, GEMMs, unpermute)": lambda: run_local(tokens, plan, layer.experts),
            "stats": lambda: layer._stats(routing, active, *batch_shape),
            "whole layer": lambda: layer(x),
        }
        for name, stage in stages.items():
            print(f"BlockFFN forward stage {name:38s} {median_ms(stage, 100):8.3f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="print kernel tables of E64 top-8, MoE++ and BlockFFN (rate 0.0625) fwd+bwd")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="run these sections only (moepp compares with topk, so it needs topk)")
    args = parser.parse_args()
    if "moepp" in args.only and "topk" not in args.only:
        parser.error("--only moepp needs topk too: MoE++ is compared with the E64 top-8 layer's time")
    out = args.out or harness.results_path("moe")
    torch.manual_seed(0)
    rec = Recorder(out)
    if "topk" in args.only:
        vanilla_ms = harness.keep_going(bench_topk, rec, args.profile) or {}
        if "moepp" in args.only and TOPK_CASES[0] in vanilla_ms:
            harness.keep_going(bench_moepp, rec, vanilla_ms, args.profile)
    if "blockffn" in args.only:
        harness.keep_going(bench_blockffn, rec, args.profile)
    if "compile" in args.only:
        harness.keep_going(bench_compile, rec)
    print(f"records appended to {out}; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
