"""MoE layer configs that the GPU tests of the layer (eager and compiled) both run."""

from sparta.moe import MoEConfig

CONFIGS = {
    "topk": MoEConfig(router="topk", num_experts=8, top_k=2, d_ff=128, num_shared_experts=1),
    "topk-capacity": MoEConfig(router="topk", num_experts=8, top_k=2, d_ff=128, capacity_factor=1.0),
    "blockffn": MoEConfig(router="blockffn", num_experts=16, d_ff=64),
    "moepp": MoEConfig(router="moepp", num_experts=8, top_k=2, d_ff=128, activation="gelu"),
    "moepp-capacity": MoEConfig(router="moepp", num_experts=8, top_k=2, d_ff=128, capacity_factor=1.0),
}
