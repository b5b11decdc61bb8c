"""`MoE`: the drop-in MoE FFN layer, `y, aux = MoE(d_model, config)(x)`."""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import MoEConfig
from .dispatch import build_plan, build_plan_from_mask, run_expert_parallel, run_local
from .experts import DenseFFN, GroupedExperts, ZeroComputationExperts
from .metrics import experts_used, routing_stats
from .routers import ROUTER_CLASSES


@dataclass
class MoEAux:
    """What one MoE forward reports besides its output.

    loss: sum of the weighted auxiliary losses; add it to the task loss (`loss = lm + aux.loss`).
    losses: each weighted term ("load_balance", "z" for top-k; "activation_locality",
        "chunk_sparsity" for BlockFFN; "load_balance" for MoE++).
    stats: detached 0-dim fp32 tensors, ready to log: "tls", "cls2" ... "cls64",
        "ffn_experts_per_token", "router_entropy", "dropped_fraction", and for MoE++
        "zero_fraction", "copy_fraction", "constant_fraction" (share of tokens that use at least one
        expert of that kind).
    expert_load: [num_experts] share of tokens routed to each FFN expert (before capacity drops).
    router_logits: [batch, seq, router experts] fp32 router logits; pass them to the next MoE++
        layer as `prev_router_logits` (gating residuals).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    expert_load: torch.Tensor
    router_logits: torch.Tensor


class MoE(nn.Module):
    """Mixture-of-Experts FFN: router ("topk" | "blockffn" | "moepp") + dropless grouped experts.

    `y, aux = layer(x, prev_router_logits=None)` with x [batch, seq, d_model]; the sequence order
    matters for BlockFFN's locality/chunk losses and for CLS. `prev_router_logits` is the previous
    MoE++ layer's `aux.router_logits` (ignored unless router="moepp" with gating_residual).

    ep_group: expert-parallel process group (created by the caller); every rank of it holds
    num_experts / group size experts and its own tokens, rows travel by all-to-all. The router,
    zero-computation and shared experts are replicated.
    """

    def __init__(self, d_model: int, config: MoEConfig, ep_group=None):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be an int >= 1, got {d_model!r}")
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.d_model = d_model
        self.config = config
        self.ep_group = ep_group
        ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        if config.num_experts % ep_size:
            raise ValueError(f"MoEConfig.num_experts={config.num_experts} must be divisible by the "
                             f"expert-parallel group size {ep_size}")
        self.router = ROUTER_CLASSES[config.router](d_model, config)
        self.experts = GroupedExperts(config.num_experts // ep_size, d_model, config.d_ff, config.activation)
        self.zero_computation = None
        if config.num_zero_computation_experts:
            self.zero_computation = ZeroComputationExperts(d_model, config.num_experts, config.num_zero_experts,
                                                           config.num_copy_experts, config.num_constant_experts)
        self.shared = None
        if config.num_shared_experts:
            self.shared = DenseFFN(d_model, config.num_shared_experts * config.d_ff, config.activation)

    def forward(self, x: torch.Tensor, prev_router_logits: torch.Tensor | None = None):
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        if prev_router_logits is not None and prev_router_logits.shape != (batch, seq, cfg.total_experts):
            raise ValueError(f"prev_router_logits must be [batch, seq, {cfg.total_experts}] (the previous layer's "
                             f"aux.router_logits, same number of router experts), got {tuple(prev_router_logits.shape)}")
        tokens = x.reshape(batch * seq, self.d_model)
        routing = self.router(tokens, (batch, seq), prev_router_logits)

        if cfg.router == "blockffn":
            computed = routing.active
            # Stats first: they are launched while the GPU still has work, before the plan's host sync.
            stats, expert_load = self._stats(routing, computed, batch, seq)
            plan = build_plan_from_mask(computed, routing.slot_weight)
        else:
            capacity = None
            if cfg.capacity_factor is not None:
                capacity = math.ceil(cfg.capacity_factor * tokens.shape[0] * cfg.top_k / cfg.num_experts)
            plan = build_plan(routing.slot_expert, routing.slot_weight, cfg.num_experts, capacity)
            computed = experts_used(routing.slot_expert, plan.token_pos >= 0, cfg.num_experts)
            stats, expert_load = self._stats(routing, computed, batch, seq)
        stats["dropped_fraction"] = plan.dropped_fraction
        if self.ep_group is None:
            y = run_local(tokens, plan, self.experts)
        else:
            y = run_expert_parallel(tokens, plan, self.experts, self.ep_group)
        if self.zero_computation is not None:
            y = y + self.zero_computation(tokens, routing.slot_expert, routing.slot_weight)
        if self.shared is not None:
            y = y + self.shared(tokens)

        aux = MoEAux(loss=sum(routing.losses.values()), losses=routing.losses, stats=stats,
                     expert_load=expert_load, router_logits=routing.logits.view(batch, seq, -1))
        return y.view(batch, seq, self.d_model), aux

    @torch.no_grad()
    def _stats(self, routing, computed, batch: int, seq: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """computed [T, E] bool: the FFN experts each token was computed by (after capacity drops)."""
        cfg = self.config
        slot_expert = routing.slot_expert
        stats = routing_stats(computed.view(batch, seq, -1), routing.probs)
        routed_load = stats.pop("expert_load")
        if cfg.router == "moepp":
            first_copy = cfg.num_experts + cfg.num_zero_experts
            first_constant = first_copy + cfg.num_copy_experts
            for name, lo, hi in (("zero", cfg.num_experts, first_copy), ("copy", first_copy, first_constant),
                                 ("constant", first_constant, cfg.total_experts)):
                stats[f"{name}_fraction"] = ((slot_expert >= lo) & (slot_expert < hi)).any(-1).float().mean()
        if cfg.capacity_factor is not None:  # the load counts the tokens dropped too
            routed = experts_used(slot_expert, torch.ones_like(slot_expert, dtype=torch.bool), cfg.num_experts)
            routed_load = routed.mean(0, dtype=torch.float32)
        return stats, routed_load

    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step (router="topk", bias_update_rate > 0): call after each
        optimizer step. `group`: the data-parallel group whose load should be summed, if any."""
        if self.config.bias_update_rate <= 0:
            raise ValueError("update_expert_bias needs MoEConfig.router='topk' and bias_update_rate > 0")
        self.router.update_bias(group)
