"""Routing statistics computed on the device at every forward (no host synchronisation).

Token-level sparsity (TLS) is the share of FFN experts a token does not use; chunk-level sparsity
(CLS) for a chunk of consecutive tokens is the share of FFN experts that no token of the chunk
uses: the experts a chunk-wise inference kernel (BlockFFN) could skip. Chunks are cut per sequence,
or per document when the documents are given (`doc_pos`, see `sparta.moe.losses.document_positions`);
a trailing partial chunk counts as a chunk.
"""
import torch
import torch.nn.functional as F

from sparta.kernels.routing_stats import routing_stats_fused

from .losses import chunk_ids

CLS_CHUNK_SIZES = (2, 4, 8, 16, 32, 64)  # 2, 4, ..., 2^K: CLS is built by halving


def experts_used(slot_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] bool: expert e is used by token t through one of its slots (ids outside [0, E) ignored)."""
    use = (slot_expert >= 0) & (slot_expert < num_experts)
    column = torch.where(use, slot_expert, num_experts)
    hits = torch.zeros(slot_expert.shape[0], num_experts + 1, device=slot_expert.device)
    hits.scatter_add_(1, column, torch.ones_like(column, dtype=torch.float32))
    return hits[:, :num_experts] > 0


def chunk_level_sparsity(used: torch.Tensor, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """CLS for every size of CLS_CHUNK_SIZES ([6] fp32) from used [B, S, E] bool; doc_pos [B, S]: the
    chunks restart at every document start."""
    batch, seq, experts = used.shape
    if doc_pos is not None:
        tokens_used = used.reshape(batch * seq, experts).float()
        used_share = []
        for size in CLS_CHUNK_SIZES:
            chunk, num_chunks = chunk_ids(doc_pos, size)
            hits = torch.zeros_like(tokens_used).index_add_(0, chunk, tokens_used)
            used_share.append((hits > 0).sum() / (num_chunks * experts))
        return 1.0 - torch.stack(used_share)
    pad = -seq % CLS_CHUNK_SIZES[-1]
    chunk_used = F.pad(used, (0, 0, 0, pad)) if pad else used
    used_share = []
    for size in CLS_CHUNK_SIZES:
        chunk_used = chunk_used.reshape(batch, -1, 2, experts).any(dim=2)
        used_share.append(chunk_used[:, :-(-seq // size)].mean(dtype=torch.float32))
    return 1.0 - torch.stack(used_share)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token routing distribution, probs [T, E]."""
    return torch.special.entr(probs).sum() / probs.shape[0]


@torch.no_grad()
def routing_stats(used: torch.Tensor, probs: torch.Tensor, doc_pos: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """TLS, CLS per chunk size, FFN experts per token and router entropy as 0-dim fp32 tensors, and
    "expert_load" [E]: the share of tokens that used each FFN expert.

    used [B, S, E] bool: FFN experts each token was computed by; probs [T, E_router]: routing
    distribution (MoE++: over FFN and zero-computation experts); doc_pos [B, S] int32 or None: CLS
    chunks restart at every document start. On CUDA one Triton kernel computes them all
    (`sparta.kernels.routing_stats`), elsewhere the torch functions above.
    """
    experts = used.shape[-1]
    if used.is_cuda:
        values = routing_stats_fused(used, probs.float(), len(CLS_CHUNK_SIZES), doc_pos)
        load, (tls, per_token, entropy), cls = values.split([experts, 3, len(CLS_CHUNK_SIZES)])
        stats = {"tls": tls, "ffn_experts_per_token": per_token, "router_entropy": entropy}
    else:
        load = used.reshape(-1, experts).mean(0, dtype=torch.float32)
        used_share = used.mean(dtype=torch.float32)
        stats = {"tls": 1.0 - used_share, "ffn_experts_per_token": used_share * experts,
                 "router_entropy": router_entropy(probs)}
        cls = chunk_level_sparsity(used, doc_pos)
    stats.update(zip((f"cls{size}" for size in CLS_CHUNK_SIZES), cls.unbind()))
    stats["expert_load"] = load
    return stats


@torch.no_grad()
def load_summary(expert_load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balance of one layer's per-expert load ([E], e.g. `MoEAux.expert_load`) as 0-dim fp32 tensors:
    "load_max", "load_min" and "load_cv", the coefficient of variation std / mean (population std;
    0 = perfectly balanced, 0 when nothing is routed)."""
    load = expert_load.float()
    mean = load.mean()
    return {"load_max": load.max(), "load_min": load.min(),
            "load_cv": load.std(correction=0) / mean.clamp_min(torch.finfo(torch.float32).tiny)}
