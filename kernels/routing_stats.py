"""Routing statistics of an MoE forward in one Triton kernel and one sum: per-expert load, token-level
sparsity, experts per token, router entropy and chunk-level sparsity for chunks of 2, 4, ..., 2^K.

The torch version (`sparta.moe.metrics`) is ~25 small ops, each a kernel launch the host pays for
at every forward. Here a program reads 2^K whole chunks' worth of positions of one sequence
(chunks are cut per sequence), halves its [rows, E] mask K times with a max over pairs of rows,
and writes its share of every statistic already scaled (program 0 adds the "1 -" of TLS and CLS),
so that `partial.sum(0)` is the result.
"""
import torch
import triton
import triton.language as tl

from .moe_permute import _interpreting


@triton.jit
def _routing_stats_kernel(
    used_ptr, probs_ptr, partial_ptr, num_sequences, S, E, E_PROBS,
    stride_ub, stride_us, stride_ue, stride_pt, stride_pe,
    NUM_CLS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EP: tl.constexpr,
):
    b, block = tl.program_id(0), tl.program_id(1)
    ROWS: tl.constexpr = GROUPS * (1 << NUM_CLS)
    s = block * ROWS + tl.arange(0, ROWS)
    e = tl.arange(0, BLOCK_E)
    mask = (s < S)[:, None] & (e < E)[None, :]
    used = tl.load(used_ptr + b * stride_ub + s.to(tl.int64)[:, None] * stride_us + e[None, :] * stride_ue,
                   mask=mask, other=0).to(tl.float32)
    ep = tl.arange(0, BLOCK_EP)
    token = (b * S + s).to(tl.int64)
    p = tl.load(probs_ptr + token[:, None] * stride_pt + ep[None, :] * stride_pe,
                mask=(s < S)[:, None] & (ep < E_PROBS)[None, :], other=0.0)
    entropy = tl.sum(tl.sum(tl.where(p > 0, -p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), axis=1), axis=0)

    num_tokens = (num_sequences * S).to(tl.float32)
    first = ((b == 0) & (block == 0)).to(tl.float32)
    out = partial_ptr + (b * tl.num_programs(1) + block).to(tl.int64) * (E + 3 + NUM_CLS)
    load = tl.sum(used, axis=0)
    count = tl.sum(load, axis=0)
    tl.store(out + e, load / num_tokens, mask=e < E)
    tl.store(out + E, first - count / (num_tokens * E))
    tl.store(out + E + 1, count / num_tokens)
    tl.store(out + E + 2, entropy / num_tokens)
    chunk_used = used
    for k in tl.static_range(NUM_CLS):  # chunks of 2 << k positions
        chunk_used = tl.max(tl.reshape(chunk_used, (ROWS >> (k + 1), 2, BLOCK_E)), axis=1)
        chunks = (num_sequences * ((S + (2 << k) - 1) // (2 << k)) * E).to(tl.float32)
        tl.store(out + E + 3 + k, first - tl.sum(tl.sum(chunk_used, axis=1), axis=0) / chunks)


def routing_stats_fused(used: torch.Tensor, probs: torch.Tensor, num_cls_sizes: int) -> torch.Tensor:
    """used [B, S, E] bool (any strides): expert e computed token (b, s); probs [B*S, E'] fp32 routing
    distribution. Returns fp32 [E + 3 + num_cls_sizes]: per-expert load (share of tokens), TLS,
    experts per token, mean router entropy (nats), then CLS for chunk sizes 2, 4, ..., 2^num_cls_sizes."""
    batch, seq, experts = used.shape
    if used.dtype != torch.bool:
        raise ValueError(f"used must be a bool [batch, seq, experts] mask, got {used.dtype}")
    if probs.dim() != 2 or probs.shape[0] != batch * seq or probs.dtype != torch.float32:
        raise ValueError(f"probs must be fp32 [batch*seq={batch * seq}, experts], got {probs.dtype} {tuple(probs.shape)}")
    block_e = triton.next_power_of_2(experts)
    group_rows = 1 << num_cls_sizes
    budget = 1 << 15 if _interpreting() else 4096
    groups = max(1, min(budget // (group_rows * block_e), triton.next_power_of_2(-(-seq // group_rows))))
    grid = (batch, triton.cdiv(seq, groups * group_rows))
    partial = torch.empty(grid[0] * grid[1], experts + 3 + num_cls_sizes, dtype=torch.float32, device=used.device)
    used_bytes = used.view(torch.int8)
    _routing_stats_kernel[grid](
        used_bytes, probs, partial, batch, seq, experts, probs.shape[1], *used_bytes.stride(), *probs.stride(),
        NUM_CLS=num_cls_sizes, GROUPS=groups, BLOCK_E=block_e, BLOCK_EP=triton.next_power_of_2(probs.shape[1]))
    return partial.sum(0)
