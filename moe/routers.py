"""Routers: token -> (experts, weights), auxiliary losses. All router math runs in fp32.

Every router is called as `router(x [T, d], (batch, seq), prev_logits, doc_pos)` (MoE++ reads the
previous layer's logits, BlockFFN's losses the positions inside packed documents,
`losses.document_positions`) and returns a `Routing` in the same "slot" form: token t has S slots,
slot j sends it to expert `slot_expert[t, j]` with weight `slot_weight[t, j]` (-1 = unused slot).
Experts are indexed FFN experts first (0..N-1), then, for MoE++, zero, copy and constant experts.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparta.kernels.blockffn_router import blockffn_router_epilogue

from .config import MoEConfig
from .losses import (
    activation_locality_loss,
    chunk_sparsity_loss,
    heterogeneous_load_balance_loss,
    router_z_loss,
    switch_load_balance_loss,
)


class Routing(NamedTuple):
    """A router's output (a named tuple, so that ZeRO-3's hooks find its tensors and re-gather the router's
    weight for the backward)."""

    slot_expert: torch.Tensor     # [T, S] int64, -1 = the slot is unused
    slot_weight: torch.Tensor     # [T, S] fp32 gate of each slot
    probs: torch.Tensor           # [T, E_router] fp32 routing distribution (entropy, balance)
    logits: torch.Tensor          # [T, E_router] fp32 router output before normalisation
    losses: dict[str, torch.Tensor]  # auxiliary losses, already multiplied by their coefficients
    active: torch.Tensor | None = None  # [T, E] bool, mask routers (BlockFFN): token t uses expert e


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T in fp32, also under autocast (which would otherwise run it in bf16)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


class TopKRouter(nn.Module):
    """Softmax or sigmoid scores, top-k, optional renormalisation (Mixtral / DeepSeek-V3).

    Losses: Switch load balance (`E * sum f_i P_i`, coefficient `load_balance_coef`) and the
    ST-MoE z-loss (`z_loss_coef`). With `bias_update_rate > 0`, DeepSeek-V3's aux-loss-free
    balancing: a per-expert bias is added to the scores for the *selection* only (the weights use
    the unbiased scores) and `update_bias` moves it by `rate * sign(mean load - load)`.
    """

    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        if config.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
            self.register_buffer("load_since_update", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, int], prev_logits=None, doc_pos=None) -> Routing:
        cfg = self.config
        logits = _router_logits(x, self.weight)
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        selection = scores + self.expert_bias if cfg.bias_update_rate > 0 else scores
        selected = selection.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, selected)
        if cfg.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        if cfg.bias_update_rate > 0 and self.training:
            with torch.no_grad():
                self.load_since_update.scatter_add_(0, selected.reshape(-1), torch.ones(selected.numel(), device=x.device))
        losses = {
            "load_balance": cfg.load_balance_coef * switch_load_balance_loss(probs, selected),
            "z": cfg.z_loss_coef * router_z_loss(logits),
        }
        return Routing(selected, weights, probs, logits, losses)

    @torch.no_grad()
    def update_bias(self, group=None) -> None:
        """Move the selection bias towards balance from the load seen since the last call."""
        load = self.load_since_update.clone()
        if group is not None:
            torch.distributed.all_reduce(load, group=group)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


class BlockFFNRouter(nn.Module):
    """BlockFFN router: linear -> ReLU -> RMSNorm; expert e is active for a token iff its score > 0.

    Song et al. 2025, "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (arXiv:2507.08771). Follows thunlp/BlockFFN,
    pretrain/cpm/dragonfly/blockffn.py (`norm_after_router="rms"`, the setting of every run in
    pretrain/entrance.sh): raw = W x, router_ori = RMSNorm(ReLU(raw)) (unweighted), expert weights
    = router_ori * g (g: learnable, initialised to 1), and the losses see the normalised
    distribution p = router_ori / (sum router_ori + 1e-5). Losses (see `losses.py`): activation
    locality on raw (coefficient 2e-3, sharpness 100 in entrance.sh) and chunk sparsification on p
    (coefficient 5e-2, chunk 64). The reference's load-balance, entropy and L1 terms are all 0 in
    those runs and are left out.
    """

    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.norm_weight = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, int], prev_logits=None, doc_pos=None) -> Routing:
        cfg = self.config
        raw = _router_logits(x, self.weight)
        # One computation, two implementations: the fused Triton kernel on CUDA (the torch version
        # is ~50 small ops forward and backward, which the host, not the GPU, would pace), the torch
        # formulas below elsewhere; tests/test_moe_blockffn_fused.py checks that they agree.
        epilogue = blockffn_router_epilogue if raw.is_cuda else blockffn_router_epilogue_torch
        weights, probs, slot_expert, active, locality, chunk = epilogue(
            raw, self.norm_weight.float(), batch_shape, eps=cfg.router_norm_eps, sharpness=cfg.locality_sharpness,
            chunk_size=cfg.chunk_size, locality_coef=cfg.locality_coef, chunk_sparsity_coef=cfg.chunk_sparsity_coef,
            doc_pos=doc_pos)
        losses = {"activation_locality": locality, "chunk_sparsity": chunk}
        return Routing(slot_expert, weights, probs, raw, losses, active)


def blockffn_router_epilogue_torch(raw: torch.Tensor, norm_weight: torch.Tensor, batch_shape: tuple[int, int], *,
                                   eps: float, sharpness: float, chunk_size: int, locality_coef: float,
                                   chunk_sparsity_coef: float, doc_pos: torch.Tensor | None = None):
    """BlockFFN after the router's linear map, in torch: the reference of
    `sparta.kernels.blockffn_router.blockffn_router_epilogue` (same arguments, same results)."""
    normed = F.rms_norm(F.relu(raw), (raw.shape[1],), eps=eps)
    weights = normed * norm_weight
    probs = normed / (normed.sum(-1, keepdim=True) + 1e-5)
    # Active = non-zero ReLU output, whatever the learnable scale g: an expert whose g is 0 still
    # runs, so that g gets its gradient.
    active = normed > 0
    slot_expert = torch.where(active, torch.arange(raw.shape[1], device=raw.device), -1)
    locality = locality_coef * activation_locality_loss(raw.view(*batch_shape, -1), sharpness, doc_pos)
    chunk = chunk_sparsity_coef * chunk_sparsity_loss(probs.view(*batch_shape, -1), chunk_size, doc_pos)
    return weights, probs, slot_expert, active, locality, chunk


class MoEPPRouter(nn.Module):
    """MoE++ router: softmax top-k over N FFN experts + zero / copy / constant experts.

    Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts"
    (arXiv:2410.07348). Follows SkyworkAI/MoE-plus-plus, MoE++/moe_plus_plus_layer.py (`Router`, `gating`): the logits
    are `W x` in fp32 plus, with gating residuals, a learned map of the previous MoE++ layer's
    logits (`gate_map`, E x E, no bias); the softmax is over all experts, the top-k gates of zero
    experts are set to 0 and the k gates renormalised to sum 1 (so a token whose slots all hit
    zero experts gets no output). The layer returns these logits for the next layer. Loss: the
    heterogeneous load balance with tau (`losses.py`), coefficient `load_balance_coef`.
    Deliberate differences from the reference code: its default gate is a 2-layer tanh MLP
    (`moe_2layer_gate=True`), here the linear gate of the paper's equations; and it multiplies the
    experts' input by top_k (`moe_feature_no_mul_topk=False`), here the input is used as is.
    """

    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.total_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        if config.gating_residual:
            self.residual_weight = nn.Parameter(torch.empty(config.total_experts, config.total_experts))
            nn.init.normal_(self.residual_weight, std=0.02)

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, int], prev_logits=None, doc_pos=None) -> Routing:
        cfg = self.config
        logits = _router_logits(x, self.weight)
        if cfg.gating_residual and prev_logits is not None:
            logits = logits + _router_logits(prev_logits.reshape(logits.shape), self.residual_weight)
        probs = logits.softmax(-1)
        top_probs, selected = probs.topk(cfg.top_k, dim=-1)
        is_zero = (selected >= cfg.num_experts) & (selected < cfg.num_experts + cfg.num_zero_experts)
        weights = torch.where(is_zero, 0.0, top_probs)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        losses = {
            "load_balance": cfg.load_balance_coef
            * heterogeneous_load_balance_loss(probs, selected, cfg.num_experts, cfg.tau),
        }
        return Routing(selected, weights, probs, logits, losses)


ROUTER_CLASSES = {"topk": TopKRouter, "blockffn": BlockFFNRouter, "moepp": MoEPPRouter}
