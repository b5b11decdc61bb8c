"""Routing statistics of an MoE forward in one Triton kernel and one sum: per-expert load, token-level
sparsity, experts per token, router entropy and chunk-level sparsity for chunks of 2, 4, ..., 2^K.

The torch version (`sparta.moe.metrics`) is ~25 small ops, each a kernel launch the host pays for
at every forward. Here a program reads 2^K whole chunks' worth of positions of one sequence
(chunks are cut per sequence), halves its [rows, E] mask K times with a max over pairs of rows,
and writes its share of every statistic already scaled (program 0 adds the "1 -" of TLS and CLS),
so that `partial.sum(0)` is the result.

With documents (`doc_pos`, each token's position inside its document) the chunks restart at every
document start. A program then owns the 2^K-chunks that start in its block of rows (found by a
prefix sum, as in `blockffn_router`), gathers a few of them at a time into a [rows, E] tile and
halves it the same way: a smaller chunk of a document is a part of one of its 2^K-chunks. The
number of chunks of each size is only known at the end, so the programs write the counts of used
(chunk, expert) pairs and of chunks, and CLS is finished after the sum.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .blockffn_router import _block_chunk_starts, _pick_chunks
from .moe_permute import _interpreting


@triton.jit
def _rows(used_ptr, probs_ptr, b, s, ok, e, ep, S, E, E_PROBS, stride_ub, stride_us, stride_ue, stride_pt, stride_pe):
    """The used mask (fp32 [rows, BLOCK_E]) and the entropy terms -p log p ([rows, BLOCK_EP]) of the rows s
    of sequence b (valid where ok)."""
    mask = ok[:, None] & (e < E)[None, :]
    used = tl.load(used_ptr + b * stride_ub + s.to(tl.int64)[:, None] * stride_us + e[None, :] * stride_ue,
                   mask=mask, other=0).to(tl.float32)
    token = (b * S + s).to(tl.int64)
    p = tl.load(probs_ptr + token[:, None] * stride_pt + ep[None, :] * stride_pe,
                mask=ok[:, None] & (ep < E_PROBS)[None, :], other=0.0)
    return used, tl.where(p > 0, -p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)


@triton.jit
def _routing_stats_kernel(
    used_ptr, probs_ptr, pos_ptr, partial_ptr, num_sequences, S, E, E_PROBS,
    stride_ub, stride_us, stride_ue, stride_pt, stride_pe,
    HAS_DOCS: tl.constexpr, NUM_CLS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EP: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, block = tl.program_id(0), tl.program_id(1)
    CHUNK: tl.constexpr = 1 << NUM_CLS
    ROWS: tl.constexpr = GROUPS * CHUNK
    e = tl.arange(0, BLOCK_E)
    ep = tl.arange(0, BLOCK_EP)
    num_tokens = (num_sequences * S).to(tl.float32)
    first = ((b == 0) & (block == 0)).to(tl.float32)
    pid = (b * tl.num_programs(1) + block).to(tl.int64)
    if HAS_DOCS:
        out = partial_ptr + pid * (E + 3 + 2 * NUM_CLS)
        rows, pos, is_start, rank, num_starts = _block_chunk_starts(pos_ptr, b, block * ROWS, S, CHUNK, ROWS)
        j = tl.arange(0, CHUNK)
        k = tl.arange(0, BLOCK_K)
        load = tl.zeros((BLOCK_E,), dtype=tl.float32)
        entropy = tl.zeros((BLOCK_EP,), dtype=tl.float32)
        cls_used = tl.zeros((BLOCK_K,), dtype=tl.float32)
        cls_chunks = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for g0 in range(0, num_starts, GROUPS):  # GROUPS 2^K-chunks at a time, one after the other in the tile
            start, first_pos, has_chunk = _pick_chunks(rows, pos, is_start, rank, g0, GROUPS)
            s = start[:, None] + j[None, :]
            ok = has_chunk[:, None] & (s < S)
            ok = ok & (tl.load(pos_ptr + b * S + s, mask=ok, other=-1) == first_pos[:, None] + j[None, :])
            used, h = _rows(used_ptr, probs_ptr, b, tl.reshape(s, (ROWS,)), tl.reshape(ok, (ROWS,)), e, ep, S, E,
                            E_PROBS, stride_ub, stride_us, stride_ue, stride_pt, stride_pe)
            load += tl.sum(used, axis=0)
            entropy += tl.sum(h, axis=0)
            chunk_used = used
            for c in tl.static_range(NUM_CLS):  # chunks of 2 << c positions
                chunk_used = tl.max(tl.reshape(chunk_used, (ROWS >> (c + 1), 2, BLOCK_E)), axis=1)
                chunks = tl.sum(tl.sum((ok & (j % (2 << c) == 0)[None, :]).to(tl.float32), axis=1), axis=0)
                cls_used += tl.where(k == c, tl.sum(tl.sum(chunk_used, axis=1), axis=0), 0.0)
                cls_chunks += tl.where(k == c, chunks, 0.0)
        count = tl.sum(load, axis=0)
        tl.store(out + E + 2, tl.sum(entropy, axis=0) / num_tokens)
        tl.store(out + E + 3 + k, cls_used, mask=k < NUM_CLS)
        tl.store(out + E + 3 + NUM_CLS + k, cls_chunks, mask=k < NUM_CLS)
    else:
        out = partial_ptr + pid * (E + 3 + NUM_CLS)
        s = block * ROWS + tl.arange(0, ROWS)
        used, h = _rows(used_ptr, probs_ptr, b, s, s < S, e, ep, S, E, E_PROBS,
                        stride_ub, stride_us, stride_ue, stride_pt, stride_pe)
        load = tl.sum(used, axis=0)
        count = tl.sum(load, axis=0)
        tl.store(out + E + 2, tl.sum(tl.sum(h, axis=1), axis=0) / num_tokens)
        chunk_used = used
        for c in tl.static_range(NUM_CLS):  # chunks of 2 << c positions
            chunk_used = tl.max(tl.reshape(chunk_used, (ROWS >> (c + 1), 2, BLOCK_E)), axis=1)
            chunks = (num_sequences * ((S + (2 << c) - 1) // (2 << c)) * E).to(tl.float32)
            tl.store(out + E + 3 + c, first - tl.sum(tl.sum(chunk_used, axis=1), axis=0) / chunks)
    tl.store(out + e, load / num_tokens, mask=e < E)
    tl.store(out + E, first - count / (num_tokens * E))
    tl.store(out + E + 1, count / num_tokens)


def routing_stats_fused(used: torch.Tensor, probs: torch.Tensor, num_cls_sizes: int,
                        doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """used [B, S, E] bool (any strides): expert e computed token (b, s); probs [B*S, E'] fp32 routing
    distribution; doc_pos: None (each sequence is one document) or [B, S] int32, each token's position
    inside its document. Returns fp32 [E + 3 + num_cls_sizes]: per-expert load (share of tokens), TLS,
    experts per token, mean router entropy (nats), then CLS for chunk sizes 2, 4, ..., 2^num_cls_sizes."""
    batch, seq, experts = used.shape
    if used.dtype != torch.bool:
        raise ValueError(f"used must be a bool [batch, seq, experts] mask, got {used.dtype}")
    if probs.dim() != 2 or probs.shape[0] != batch * seq or probs.dtype != torch.float32:
        raise ValueError(f"probs must be fp32 [batch*seq={batch * seq}, experts], got {probs.dtype} {tuple(probs.shape)}")
    if doc_pos is not None and (doc_pos.shape != (batch, seq) or doc_pos.dtype != torch.int32):
        raise ValueError(f"doc_pos must be int32 [batch={batch}, seq={seq}], got {doc_pos.dtype} {tuple(doc_pos.shape)}")
    if torch.compiler.is_compiling():
        return _routing_stats_op(used, probs, num_cls_sizes, doc_pos)
    return _routing_stats_launch(used, probs, num_cls_sizes, doc_pos)


def _routing_stats_launch(used: torch.Tensor, probs: torch.Tensor, num_cls_sizes: int,
                          doc_pos: torch.Tensor | None) -> torch.Tensor:
    batch, seq, experts = used.shape
    block_e = triton.next_power_of_2(experts)
    group_rows = 1 << num_cls_sizes
    budget = 1 << 15 if _interpreting() else 4096
    groups = max(1, min(budget // (group_rows * block_e), triton.next_power_of_2(-(-seq // group_rows))))
    if doc_pos is not None:  # the choice of the chunk starts is a [groups, groups * 2^K] tile
        while groups > 1 and groups * groups * group_rows > budget:
            groups //= 2
    grid = (batch, triton.cdiv(seq, groups * group_rows))
    width = experts + 3 + num_cls_sizes * (1 if doc_pos is None else 2)
    partial = torch.empty(grid[0] * grid[1], width, dtype=torch.float32, device=used.device)
    used_bytes = used.view(torch.int8)
    _routing_stats_kernel[grid](
        used_bytes, probs, used_bytes if doc_pos is None else doc_pos.contiguous(), partial, batch, seq, experts,
        probs.shape[1], *used_bytes.stride(), *probs.stride(), HAS_DOCS=doc_pos is not None, NUM_CLS=num_cls_sizes,
        GROUPS=groups, BLOCK_E=block_e, BLOCK_EP=triton.next_power_of_2(probs.shape[1]),
        BLOCK_K=triton.next_power_of_2(num_cls_sizes))
    values = partial.sum(0)
    if doc_pos is None:
        return values
    head, used_pairs, chunks = values.split([experts + 3, num_cls_sizes, num_cls_sizes])
    return torch.cat([head, 1.0 - used_pairs / (chunks * experts)])


# For torch.compile: one opaque op (Inductor cannot lower the bool -> int8 view the kernel reads through).
@torch.library.custom_op("sparta::routing_stats", mutates_args=())
def _routing_stats_op(used: torch.Tensor, probs: torch.Tensor, num_cls_sizes: int,
                      doc_pos: Optional[torch.Tensor]) -> torch.Tensor:
    return _routing_stats_launch(used, probs, num_cls_sizes, doc_pos)


@_routing_stats_op.register_fake
def _(used, probs, num_cls_sizes, doc_pos):
    return probs.new_empty(used.shape[-1] + 3 + num_cls_sizes)
