"""What several MoE test files share: layer configs (the GPU tests, eager and compiled), a layer whose
routing is known, and the set-up of a spawned expert-parallel rank."""

import torch
import torch.distributed as dist

from sparta.moe import MoE, MoEConfig

CONFIGS = {
    "topk": MoEConfig(router="topk", num_experts=8, top_k=2, d_ff=128, num_shared_experts=1),
    "topk-capacity": MoEConfig(router="topk", num_experts=8, top_k=2, d_ff=128, capacity_factor=1.0),
    "blockffn": MoEConfig(router="blockffn", num_experts=16, d_ff=64),
    "moepp": MoEConfig(router="moepp", num_experts=8, top_k=2, d_ff=128, activation="gelu"),
    "moepp-capacity": MoEConfig(router="moepp", num_experts=8, top_k=2, d_ff=128, capacity_factor=1.0),
}


def top1_by_basis_direction(experts: int) -> MoE:
    """A top-1 layer (d_model = experts) whose router sends the basis token e_i to expert i."""
    layer = MoE(experts, MoEConfig(router="topk", num_experts=experts, top_k=1, d_ff=8))
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(experts))
    return layer


def join_process_group(rank: int, init_file: str, world: int, backend: str) -> torch.device:
    """In a spawned test rank: join the process group; returns the rank's device (its GPU under NCCL)."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    return device
