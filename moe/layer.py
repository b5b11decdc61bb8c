"""`MoE`: the drop-in MoE FFN layer, `y, aux = MoE(d_model, config)(x)`."""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import MoEConfig
from .dispatch import build_plan, build_plan_from_mask, run_expert_parallel, run_local, within_capacity
from .experts import DenseFFN, GroupedExperts, ZeroComputationExperts
from .losses import document_positions
from .metrics import experts_used, routing_stats
from .routers import ROUTER_CLASSES

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass
class MoEAux:
    """What one MoE forward reports besides its output.

    loss: sum of the weighted auxiliary losses; add it to the task loss (`loss = lm + aux.loss`).
    losses: each weighted term ("load_balance", "z" for top-k; "activation_locality",
        "chunk_sparsity" for BlockFFN; "load_balance" for MoE++).
    stats: detached 0-dim fp32 tensors, ready to log: "tls", "cls2" ... "cls64",
        "ffn_experts_per_token", "router_entropy", "dropped_fraction" (share of the slots routed to
        FFN experts that the capacity dropped), and for MoE++ "zc_dropped_fraction" (the same for
        zero-computation experts) and "zero_fraction", "copy_fraction", "constant_fraction" (share
        of tokens routed to at least one expert of that kind, before capacity drops).
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
    """Mixture-of-Experts FFN: router ("topk" | "blockffn" | "moepp") + grouped experts, dropless
    unless MoEConfig.capacity_factor is set.

    `y, aux = layer(x, prev_router_logits=None, doc_ids=None)` with x [batch, seq, d_model]; the
    sequence order matters for BlockFFN's locality/chunk losses and for CLS. `prev_router_logits` is
    the previous MoE++ layer's `aux.router_logits` (ignored unless router="moepp" with
    gating_residual). `doc_ids` [batch, seq] integer: the packed document of each token (e.g. the
    count of end-of-text tokens before it); a token whose id differs from its predecessor's starts
    a document. BlockFFN's locality loss then only pairs tokens of one document, and its chunk loss
    and CLS cut chunks from every document start (a trailing partial chunk is a chunk); None: each
    sequence is one document. Computed on the device without host synchronisation, by the fused
    Triton kernels on CUDA as without documents.

    ep_group: expert-parallel process group (created by the caller); every rank of it holds
    num_experts / group size experts and its own tokens, rows travel by all-to-all. The router,
    zero-computation and shared experts are replicated.

    `torch.compile(layer, fullgraph=True)` compiles every router, local or expert-parallel,
    forward and backward: the Triton kernels and the steps whose sizes depend on the routing are
    custom ops (tests/test_moe_compile.py), so new routing at every step reuses one graph. Only
    another input shape, `doc_ids` given or not, or a changed loss coefficient (once: it then
    becomes a graph input) compile again.
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

    def forward(self, x: torch.Tensor, prev_router_logits: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None):
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        if prev_router_logits is not None and prev_router_logits.shape != (batch, seq, cfg.total_experts):
            raise ValueError(f"prev_router_logits must be [batch, seq, {cfg.total_experts}] (the previous layer's "
                             f"aux.router_logits, same number of router experts), got {tuple(prev_router_logits.shape)}")
        doc_pos = None
        if doc_ids is not None:
            if doc_ids.shape != (batch, seq) or doc_ids.dtype not in _INTEGER_DTYPES or doc_ids.device != x.device:
                raise ValueError(f"doc_ids must be an integer [batch, seq] = {(batch, seq)} tensor on {x.device} (the "
                                 f"document of each token), got {doc_ids.dtype} {tuple(doc_ids.shape)} on {doc_ids.device}")
            doc_pos = document_positions(doc_ids)
        tokens = x.reshape(batch * seq, self.d_model)
        routing = self.router(tokens, (batch, seq), prev_router_logits, doc_pos)

        slot_expert = routing.slot_expert
        if cfg.router == "blockffn":
            computed = routing.active
            # Stats first: they are launched while the GPU still has work, before the plan's host sync.
            stats, expert_load = self._stats(routing, computed, slot_expert, batch, seq, doc_pos)
            plan = build_plan_from_mask(computed, routing.slot_weight)
        else:
            if cfg.capacity_factor is not None:
                ffn_capacity, zc_capacity = cfg.expert_capacity(tokens.shape[0])
                capacity = torch.full((cfg.total_experts,), zc_capacity, device=x.device)
                capacity[:cfg.num_experts] = ffn_capacity
                slot_expert = torch.where(within_capacity(slot_expert, capacity), slot_expert, -1)
            plan = build_plan(slot_expert, routing.slot_weight, cfg.num_experts)
            computed = experts_used(slot_expert, cfg.num_experts)
            stats, expert_load = self._stats(routing, computed, slot_expert, batch, seq, doc_pos)
        if self.ep_group is None:
            y = run_local(tokens, plan, self.experts)
        else:
            y = run_expert_parallel(tokens, plan, self.experts, self.ep_group)
        if self.zero_computation is not None:
            y = y + self.zero_computation(tokens, slot_expert, routing.slot_weight)
        if self.shared is not None:
            y = y + self.shared(tokens)

        aux = MoEAux(loss=sum(routing.losses.values()), losses=routing.losses, stats=stats,
                     expert_load=expert_load, router_logits=routing.logits.view(batch, seq, -1))
        return y.view(batch, seq, self.d_model), aux

    @torch.no_grad()
    def _stats(self, routing, computed, slot_expert, batch: int, seq: int,
               doc_pos) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """computed [T, E] bool: the FFN experts each token was computed by; slot_expert [T, S]: the
        router's slots after capacity drops (-1 = dropped or unused)."""
        cfg = self.config
        routed = routing.slot_expert
        stats = routing_stats(computed.view(batch, seq, -1), routing.probs, doc_pos)
        expert_load = stats.pop("expert_load")
        stats["dropped_fraction"] = torch.zeros((), device=computed.device)
        if cfg.router == "moepp":
            first_copy = cfg.num_experts + cfg.num_zero_experts
            first_constant = first_copy + cfg.num_copy_experts
            for name, lo, hi in (("zero", cfg.num_experts, first_copy), ("copy", first_copy, first_constant),
                                 ("constant", first_constant, cfg.total_experts)):
                of_kind = (routed >= lo) & (routed < hi)
                stats[f"{name}_fraction"] = of_kind.any(-1).float().mean()
                stats[f"{name}_slot_fraction"] = of_kind.float().mean()
            stats["zc_dropped_fraction"] = torch.zeros((), device=computed.device)
        if cfg.capacity_factor is not None:  # the load counts the tokens dropped too
            expert_load = experts_used(routed, cfg.num_experts).mean(0, dtype=torch.float32)
            dropped = slot_expert < 0
            is_ffn = (routed >= 0) & (routed < cfg.num_experts)
            stats["dropped_fraction"] = (is_ffn & dropped).sum() / is_ffn.sum().clamp_min(1)
            if cfg.router == "moepp":
                is_zc = routed >= cfg.num_experts
                stats["zc_dropped_fraction"] = (is_zc & dropped).sum() / is_zc.sum().clamp_min(1)
        return stats, expert_load

    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step (router="topk", bias_update_rate > 0): call after each
        optimizer step. `group`: the data-parallel group whose load should be summed, if any."""
        if self.config.bias_update_rate <= 0:
            raise ValueError("update_expert_bias needs MoEConfig.router='topk' and bias_update_rate > 0")
        self.router.update_bias(group)
