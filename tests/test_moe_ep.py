"""Expert parallelism over 2 gloo processes == one process with all experts (output and gradients).
(tests/gpu/test_moe_ep_gpu.py runs the same check over NCCL, one GPU per process.)

Each rank builds the full single-process layer from the same seed, runs it on the tokens of both
ranks, and checks its EP layer (half of the experts, its own tokens) against its slice of that:
outputs and input gradients for its tokens, expert-weight gradients for its experts, and the
replicated parameters' gradients summed over the ranks. Tolerance 1e-5 (fp32).
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_cases import join_process_group

from sparta.moe import MoE, MoEConfig

WORLD = 2
CONFIGS = {
    "topk": dict(router="topk", num_experts=4, top_k=2, d_ff=16, num_shared_experts=1),
    "moepp": dict(router="moepp", num_experts=4, top_k=2, d_ff=16),
    "blockffn": dict(router="blockffn", num_experts=4, d_ff=16),
}
EXPERT_PARAMS = ("experts.w_in", "experts.w_out")


def _close(actual, expected, what):
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-12
    assert error <= 1e-5 * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def _check_router(rank, router, device):
    cfg = MoEConfig(**CONFIGS[router])
    torch.manual_seed(0)
    full = MoE(12, cfg).to(device)
    x_all = torch.randn(WORLD, 10, 12).to(device)  # rank r owns batch row r
    grad_all = torch.randn(WORLD, 10, 12).to(device)
    x_ref = x_all.clone().requires_grad_()
    y_ref, _ = full(x_ref)
    (y_ref * grad_all).sum().backward()

    ep = MoE(12, cfg, ep_group=dist.group.WORLD).to(device)
    local = cfg.num_experts // WORLD
    with torch.no_grad():
        for name, p in ep.named_parameters():
            source = dict(full.named_parameters())[name]
            p.copy_(source[rank * local:(rank + 1) * local] if name in EXPERT_PARAMS else source)
    x = x_all[rank:rank + 1].clone().requires_grad_()
    y, _ = ep(x)
    (y * grad_all[rank:rank + 1]).sum().backward()

    _close(y, y_ref[rank:rank + 1], f"{router}: output")
    _close(x.grad, x_ref.grad[rank:rank + 1], f"{router}: dx")
    for name, p in ep.named_parameters():
        expected = dict(full.named_parameters())[name].grad
        if expected is None:  # e.g. MoE++'s residual map without previous logits
            assert p.grad is None, f"{router}: {name}"
        elif name in EXPERT_PARAMS:
            _close(p.grad, expected[rank * local:(rank + 1) * local], f"{router}: {name}")
        else:
            summed = p.grad.clone()
            dist.all_reduce(summed)
            _close(summed, expected, f"{router}: {name}")


def _worker(rank, init_file, backend):
    device = join_process_group(rank, init_file, WORLD, backend)
    try:
        for router in CONFIGS:
            _check_router(rank, router, device)
    finally:
        dist.destroy_process_group()


def run_expert_parallel_check(tmp_path, backend: str) -> None:
    """One spawn for every router: starting the two processes is most of the cost."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend), nprocs=WORLD, join=True)


def test_expert_parallel_matches_single_process(tmp_path):
    run_expert_parallel_check(tmp_path, "gloo")
