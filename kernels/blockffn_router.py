"""BlockFFN router epilogue in one Triton kernel per pass: raw scores -> expert weights, routing
distribution, active mask and both BlockFFN losses.

The torch formulas (`sparta.moe.routers.BlockFFNRouter`, `sparta.moe.losses`) take about 25 small
ops on [T, E] forward and as many backward; at low activation rates the layer's time is then the
host launching them, not the GPU. Here, per token t of sequence b and expert e (raw = router
scores s, fp32):

    r = relu(s), n = r / sqrt(mean_e r^2 + eps), weights = n * g, p = n / (sum_e n + 1e-5),
    active = n > 0 (also as slot_expert: e or -1),
    locality = coef_l * mean_{pairs (t-1, t), e} BCE_logits(alpha * s[t-1], sigmoid(alpha * s[t])),
    chunk    = coef_c * (1 - mean_{chunk, e} prod_{t in chunk} (1 - p + 1e-5)).

Without documents a sequence is one document: the pairs are all (t-1, t) and the chunks are cut
from its first token. With `doc_pos` (each token's position inside its document, 0 at a document
start) a pair joins two tokens of one document only, and the chunks restart at every document
start (a document's trailing partial chunk is a chunk).

A program owns whole loss chunks of one sequence, so each chunk's product is finished in
registers; the locality pair (t-1, t) reads the previous row again (an L2 hit). Without documents
the chunks of a program are consecutive and every program writes its share of both losses, already
scaled (program 0 adds the chunk loss's "1 -"), so one torch sum finishes them. With documents a
program owns the chunks that *start* in its block of rows (found by a prefix sum over the block),
handled a few at a time in a loop; the number of pairs and chunks is only known at the end, so the
programs write unscaled sums and counts that one small kernel finishes. Both are deterministic. The
backward recomputes the forward from the raw scores and the saved chunk products, and returns d raw
and d g.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .moe_permute import _interpreting


@triton.jit
def _chunk_rows(pos_ptr, b, start, first_pos, has_chunk, jj, S, chunk_size, HAS_DOCS: tl.constexpr):
    """Rows start + jj of C chunks of sequence b ([C, J] positions), which of them are in their chunk,
    and their position in their document (in the sequence, without documents)."""
    s = start[:, None] + jj[None, :]
    ok = has_chunk[:, None] & (jj < chunk_size)[None, :] & (s < S)
    if HAS_DOCS:
        pos = tl.load(pos_ptr + b * S + s, mask=ok, other=-1)
        ok = ok & (pos == first_pos[:, None] + jj[None, :])  # a document start ends the chunk
    else:
        pos = s
    return s, ok, pos


@triton.jit
def _tile(raw_ptr, b, s, row_ok, e, S, E, eps):
    """Offsets, mask and the forward values of the rows s of sequence b ([C, J], valid where row_ok)."""
    mask = row_ok[:, :, None] & (e < E)[None, None, :]
    offs = ((b * S + s).to(tl.int64) * E)[:, :, None] + e[None, None, :]
    raw = tl.load(raw_ptr + offs, mask=mask, other=0.0)
    r = tl.maximum(raw, 0.0)
    inv_rms = 1.0 / tl.sqrt(tl.sum(r * r, axis=2) / E + eps)
    n = r * inv_rms[:, :, None]
    denom = tl.sum(n, axis=2) + 1e-5
    p = n / denom[:, :, None]
    return mask, offs, raw, r, inv_rms, n, denom, p


@triton.jit
def _block_chunk_starts(pos_ptr, b, row0, S, chunk_size, BLOCK_R: tl.constexpr):
    """With documents: the rows [row0, row0 + BLOCK_R) of sequence b, their positions in their documents,
    which of them start a chunk, the rank of each start among them, and the number of starts."""
    rows = row0 + tl.arange(0, BLOCK_R)
    pos = tl.load(pos_ptr + b * S + rows, mask=rows < S, other=1)
    is_start = (rows < S) & (pos % chunk_size == 0)
    rank = tl.cumsum(is_start.to(tl.int32), 0) - 1
    return rows, pos, is_start, rank, tl.sum(is_start.to(tl.int32), axis=0)


@triton.jit
def _pick_chunks(rows, pos, is_start, rank, k0, CHUNKS: tl.constexpr):
    """The chunk starts of rank k0 .. k0 + CHUNKS - 1: their rows, their positions in their documents,
    and which of them exist."""
    k = k0 + tl.arange(0, CHUNKS)
    pick = is_start[None, :] & (rank[None, :] == k[:, None])  # [C, R]: at most one row per chunk
    start = tl.sum(tl.where(pick, rows[None, :], 0), axis=1)
    first_pos = tl.sum(tl.where(pick, pos[None, :], 0), axis=1)
    return start, first_pos, tl.sum(pick.to(tl.int32), axis=1) > 0


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x as torch.log1p (Goldberg's correction of the rounded 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _bce_with_logits(x, y):
    return tl.maximum(x, 0.0) - x * y + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _fwd_chunks(raw_ptr, pos_ptr, g, weights_ptr, probs_ptr, slot_expert_ptr, active_t_ptr, chunk_unused_ptr,
                b, start, first_pos, has_chunk, chunk_row, locality, pairs, j, e, T, S, E, chunk_size, eps, sharpness,
                HAS_DOCS: tl.constexpr, BLOCK_J: tl.constexpr):
    """Forward of C chunks: stores the per-token outputs and the chunk products; returns the locality
    BCE sums, the number of locality pairs and the sum of the chunk products."""
    log_unused = tl.zeros((start.shape[0], g.shape[0]), dtype=tl.float32)
    for j0 in range(0, chunk_size, BLOCK_J):
        s, row_ok, pos = _chunk_rows(pos_ptr, b, start, first_pos, has_chunk, j0 + j, S, chunk_size, HAS_DOCS)
        mask, offs, raw, r, inv_rms, n, denom, p = _tile(raw_ptr, b, s, row_ok, e, S, E, eps)
        tl.store(weights_ptr + offs, n * g[None, None, :], mask=mask)
        tl.store(probs_ptr + offs, p, mask=mask)
        active = n > 0
        tl.store(slot_expert_ptr + offs, tl.where(active, e[None, None, :], -1).to(tl.int64), mask=mask)
        token = (b * S + s).to(tl.int64)
        tl.store(active_t_ptr + e.to(tl.int64)[None, None, :] * T + token[:, :, None], active.to(tl.int8), mask=mask)
        log_unused += tl.sum(tl.where(mask, _log1p(1e-5 - p), 0.0), axis=1)
        has_prev = mask & (pos >= 1)[:, :, None]  # the previous token is in the same document
        previous = tl.load(raw_ptr + offs - E, mask=has_prev, other=0.0)
        bce = _bce_with_logits(sharpness * previous, tl.sigmoid(sharpness * raw))
        locality += tl.where(has_prev, bce, 0.0)
        pairs += tl.sum(tl.sum((row_ok & (pos >= 1)).to(tl.float32), axis=1), axis=0)
    chunk_mask = has_chunk[:, None] & (e < E)[None, :]
    unused = tl.where(chunk_mask, tl.exp(log_unused), 0.0)
    tl.store(chunk_unused_ptr + chunk_row.to(tl.int64)[:, None] * E + e[None, :], unused, mask=chunk_mask)
    return locality, pairs, tl.sum(tl.sum(unused, axis=1), axis=0)


@triton.jit
def _blockffn_router_fwd_kernel(
    raw_ptr, g_ptr, pos_ptr, weights_ptr, probs_ptr, slot_expert_ptr, active_t_ptr, chunk_unused_ptr, partial_ptr,
    T, S, E, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale, chunk_coef,
    HAS_DOCS: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b, block = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BLOCK_J)
    e = tl.arange(0, BLOCK_E)
    g = tl.load(g_ptr + e, mask=e < E, other=0.0)
    locality = tl.zeros((CHUNKS, BLOCK_J, BLOCK_E), dtype=tl.float32)
    pairs = tl.zeros((), dtype=tl.float32)
    pid = b * tl.num_programs(1) + block
    if HAS_DOCS:
        rows, pos, is_start, rank, num_starts = _block_chunk_starts(pos_ptr, b, block * BLOCK_R, S, chunk_size, BLOCK_R)
        unused_sum = tl.zeros((), dtype=tl.float32)
        for k0 in range(0, num_starts, CHUNKS):
            start, first_pos, has_chunk = _pick_chunks(rows, pos, is_start, rank, k0, CHUNKS)
            locality, pairs, chunk_sum = _fwd_chunks(
                raw_ptr, pos_ptr, g, weights_ptr, probs_ptr, slot_expert_ptr, active_t_ptr, chunk_unused_ptr,
                b, start, first_pos, has_chunk, b * S + start, locality, pairs, j, e, T, S, E, chunk_size, eps,
                sharpness, HAS_DOCS, BLOCK_J)
            unused_sum += chunk_sum
        out = partial_ptr + 4 * pid
        tl.store(out, tl.sum(tl.sum(tl.sum(locality, axis=2), axis=1), axis=0))
        tl.store(out + 1, unused_sum)
        tl.store(out + 2, pairs)
        tl.store(out + 3, num_starts.to(tl.float32))
    else:
        chunks = block * CHUNKS + tl.arange(0, CHUNKS)
        locality, pairs, unused_sum = _fwd_chunks(
            raw_ptr, pos_ptr, g, weights_ptr, probs_ptr, slot_expert_ptr, active_t_ptr, chunk_unused_ptr,
            b, chunks * chunk_size, chunks * chunk_size, chunks < num_chunks, b * num_chunks + chunks, locality, pairs,
            j, e, T, S, E, chunk_size, eps, sharpness, HAS_DOCS, BLOCK_J)
        first = (pid == 0).to(tl.float32)
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(tl.sum(locality, axis=2), axis=1), axis=0) * locality_scale)
        tl.store(partial_ptr + 2 * pid + 1, chunk_coef * first - unused_sum * chunk_scale)


@triton.jit
def _finish_document_losses_kernel(partial_ptr, out_ptr, num_programs, E, locality_coef, chunk_coef,
                                   BLOCK: tl.constexpr):
    """With documents: the programs' [locality BCE sum, chunk product sum, pairs, chunks] -> out =
    [locality loss, chunk loss, pairs, chunks] (a batch without any pair has locality loss 0)."""
    c = tl.arange(0, 4)
    sums = tl.zeros((BLOCK, 4), dtype=tl.float32)
    for p0 in range(0, num_programs, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        sums += tl.load(partial_ptr + p[:, None] * 4 + c[None, :], mask=(p < num_programs)[:, None], other=0.0)
    total = tl.sum(sums, axis=0)
    bce = tl.sum(tl.where(c == 0, total, 0.0), axis=0)
    unused = tl.sum(tl.where(c == 1, total, 0.0), axis=0)
    pairs = tl.sum(tl.where(c == 2, total, 0.0), axis=0)
    chunks = tl.sum(tl.where(c == 3, total, 0.0), axis=0)
    locality = locality_coef * bce / (tl.maximum(pairs, 1.0) * E)
    chunk = chunk_coef * (1.0 - unused / (chunks * E))
    tl.store(out_ptr + c, tl.where(c == 0, locality, tl.where(c == 1, chunk, total)))


@triton.jit
def _bwd_chunks(raw_ptr, pos_ptr, g, chunk_unused_ptr, d_weights_ptr, d_probs_ptr, d_raw_ptr, d_g,
                b, start, first_pos, has_chunk, chunk_row, j, e, S, E, chunk_size, eps, sharpness, d_locality, d_chunk,
                HAS_D_PROBS: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_J: tl.constexpr):
    """Backward of C chunks: stores d raw, returns d g accumulated."""
    chunk_mask = has_chunk[:, None] & (e < E)[None, :]
    unused = tl.load(chunk_unused_ptr + chunk_row.to(tl.int64)[:, None] * E + e[None, :], mask=chunk_mask, other=0.0)
    for j0 in range(0, chunk_size, BLOCK_J):
        s, row_ok, pos = _chunk_rows(pos_ptr, b, start, first_pos, has_chunk, j0 + j, S, chunk_size, HAS_DOCS)
        mask, offs, raw, r, inv_rms, n, denom, p = _tile(raw_ptr, b, s, row_ok, e, S, E, eps)
        d_weights = tl.load(d_weights_ptr + offs, mask=mask, other=0.0)
        d_g += tl.sum(tl.sum(d_weights * n, axis=1), axis=0)
        # chunk loss: d/dp of -(1/N) prod_t (1 - p_t + 1e-5) is prod / (1 - p + 1e-5) / N
        d_p = tl.where(mask, d_chunk * unused[:, None, :] / (1.0 + 1e-5 - p), 0.0)
        if HAS_D_PROBS:
            d_p += tl.load(d_probs_ptr + offs, mask=mask, other=0.0)
        d_n = d_weights * g[None, None, :] + (d_p - tl.sum(d_p * n, axis=2)[:, :, None] / denom[:, :, None]) / denom[:, :, None]
        inv3 = inv_rms * inv_rms * inv_rms
        d_r = d_n * inv_rms[:, :, None] - r * (inv3 * tl.sum(d_n * r, axis=2) / E)[:, :, None]
        d_raw = tl.where(raw > 0, d_r, 0.0)
        # locality: s[t] is the logit of pair (t, t+1) and the target of pair (t-1, t)
        sig = tl.sigmoid(sharpness * raw)
        has_next = mask & (s + 1 < S)[:, :, None]
        if HAS_DOCS:  # the next token continues the document
            next_pos = tl.load(pos_ptr + b * S + s + 1, mask=row_ok & (s + 1 < S), other=0)
            has_next = has_next & (next_pos >= 1)[:, :, None]
        following = tl.load(raw_ptr + offs + E, mask=has_next, other=0.0)
        d_raw += tl.where(has_next, d_locality * sharpness * (sig - tl.sigmoid(sharpness * following)), 0.0)
        has_prev = mask & (pos >= 1)[:, :, None]
        previous = tl.load(raw_ptr + offs - E, mask=has_prev, other=0.0)
        d_raw += tl.where(has_prev, -d_locality * sharpness * sharpness * previous * sig * (1.0 - sig), 0.0)
        tl.store(d_raw_ptr + offs, d_raw, mask=mask)
    return d_g


@triton.jit
def _blockffn_router_bwd_kernel(
    raw_ptr, g_ptr, pos_ptr, chunk_unused_ptr, d_weights_ptr, d_probs_ptr, d_losses_ptr, counts_ptr, d_raw_ptr, d_g_ptr,
    S, E, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale,
    HAS_D_PROBS: tl.constexpr, HAS_DOCS: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b, block = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BLOCK_J)
    e = tl.arange(0, BLOCK_E)
    g = tl.load(g_ptr + e, mask=e < E, other=0.0)
    if HAS_DOCS:  # the scales arrive as the coefficients; the counts are the forward's
        locality_scale = locality_scale / (tl.maximum(tl.load(counts_ptr), 1.0) * E)
        chunk_scale = chunk_scale / (tl.load(counts_ptr + 1) * E)
    d_locality = tl.load(d_losses_ptr) * locality_scale  # d loss / d (one BCE term)
    d_chunk = tl.load(d_losses_ptr + 1) * chunk_scale    # -d loss / d (one chunk product)
    d_g = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_DOCS:
        rows, pos, is_start, rank, num_starts = _block_chunk_starts(pos_ptr, b, block * BLOCK_R, S, chunk_size, BLOCK_R)
        for k0 in range(0, num_starts, CHUNKS):
            start, first_pos, has_chunk = _pick_chunks(rows, pos, is_start, rank, k0, CHUNKS)
            d_g = _bwd_chunks(raw_ptr, pos_ptr, g, chunk_unused_ptr, d_weights_ptr, d_probs_ptr, d_raw_ptr, d_g,
                              b, start, first_pos, has_chunk, b * S + start, j, e, S, E, chunk_size, eps, sharpness,
                              d_locality, d_chunk, HAS_D_PROBS, HAS_DOCS, BLOCK_J)
    else:
        chunks = block * CHUNKS + tl.arange(0, CHUNKS)
        d_g = _bwd_chunks(raw_ptr, pos_ptr, g, chunk_unused_ptr, d_weights_ptr, d_probs_ptr, d_raw_ptr, d_g,
                          b, chunks * chunk_size, chunks * chunk_size, chunks < num_chunks, b * num_chunks + chunks,
                          j, e, S, E, chunk_size, eps, sharpness, d_locality, d_chunk, HAS_D_PROBS, HAS_DOCS, BLOCK_J)
    pid = b * tl.num_programs(1) + block
    tl.store(d_g_ptr + pid.to(tl.int64) * E + e, d_g, mask=e < E)


def _blocks(chunk_size: int, num_chunks: int, num_experts: int, elements: int,
            documents: bool) -> tuple[int, int, int, int]:
    """(chunks per program or per loop step, rows per step, expert columns, rows per program with
    documents): about `elements` values per [rows, E] tile on the GPU (and per [chunks, rows] choice of
    the chunk starts with documents); in the interpreter, whose cost is per program, large tiles."""
    block_e = triton.next_power_of_2(num_experts)
    budget = 1 << 15 if _interpreting() else elements
    block_j = max(1, min(triton.next_power_of_2(chunk_size), budget // block_e))
    chunks = 1
    if block_j >= chunk_size:  # whole chunks fit a step: several per program
        chunks = max(1, min(budget // (block_j * block_e), triton.next_power_of_2(num_chunks)))
    if documents:
        while chunks > 1 and chunks * chunks * triton.next_power_of_2(chunk_size) > budget:
            chunks //= 2
    return chunks, block_j, block_e, chunks * triton.next_power_of_2(chunk_size)


def _loss_scales(documents: bool, batch, seq, num_experts, num_chunks, locality_coef, chunk_coef):
    """The factors the kernels multiply their loss sums by: the weights over the number of terms, or
    with documents the weights alone (the kernels divide by the counts of pairs and chunks)."""
    if documents:
        return locality_coef, chunk_coef
    locality_scale = locality_coef / (batch * (seq - 1) * num_experts) if seq > 1 else 0.0
    return locality_scale, chunk_coef / (batch * num_chunks * num_experts)


def _epilogue_forward(raw, g, doc_pos, batch, seq, eps, sharpness, chunk_size, locality_coef, chunk_coef):
    """Launch the forward kernels: (weights, probs, slot_expert, active_t [E, T] bool, losses, chunk_unused);
    losses = [locality, chunk] (+ [pairs, chunks] with documents), chunk_unused is kept for the backward."""
    num_tokens, num_experts = raw.shape
    documents = doc_pos is not None
    num_chunks = -(-seq // chunk_size)
    locality_scale, chunk_scale = _loss_scales(documents, batch, seq, num_experts, num_chunks, locality_coef,
                                               chunk_coef)
    chunks, block_j, block_e, block_r = _blocks(chunk_size, num_chunks, num_experts, 4096, documents)
    grid = (batch, triton.cdiv(seq, block_r) if documents else triton.cdiv(num_chunks, chunks))
    weights, probs = torch.empty_like(raw), torch.empty_like(raw)
    slot_expert = torch.empty(raw.shape, dtype=torch.int64, device=raw.device)
    active_t = torch.empty(num_experts, num_tokens, dtype=torch.bool, device=raw.device)
    # With documents a chunk's product is kept at the row of its first token.
    chunk_unused = torch.empty(num_tokens if documents else batch * num_chunks, num_experts,
                               dtype=torch.float32, device=raw.device)
    partial = torch.empty(grid[0] * grid[1], 4 if documents else 2, dtype=torch.float32, device=raw.device)
    _blockffn_router_fwd_kernel[grid](
        raw, g, doc_pos if documents else raw, weights, probs, slot_expert, active_t.view(torch.int8), chunk_unused,
        partial, num_tokens, seq, num_experts, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale,
        chunk_coef, HAS_DOCS=documents, CHUNKS=chunks, BLOCK_R=block_r, BLOCK_J=block_j, BLOCK_E=block_e,
        num_warps=8)
    if documents:
        losses = torch.empty(4, dtype=torch.float32, device=raw.device)  # + the counts, for the backward
        _finish_document_losses_kernel[(1,)](
            partial, losses, partial.shape[0], num_experts, locality_coef, chunk_coef,
            BLOCK=min(1024, triton.next_power_of_2(partial.shape[0])))
    else:
        losses = partial.sum(0)
    return weights, probs, slot_expert, active_t, losses, chunk_unused


def _epilogue_backward(raw, g, doc_pos, chunk_unused, losses, d_weights, d_probs, d_losses,
                       batch, seq, eps, sharpness, chunk_size, locality_coef, chunk_coef):
    """(d raw, d g) from the gradients of weights, probs (None: zero) and the two losses."""
    documents = doc_pos is not None
    num_experts = raw.shape[1]
    num_chunks = -(-seq // chunk_size)
    locality_scale, chunk_scale = _loss_scales(documents, batch, seq, num_experts, num_chunks, locality_coef,
                                               chunk_coef)
    chunks, block_j, block_e, block_r = _blocks(chunk_size, num_chunks, num_experts, 2048, documents)
    grid = (batch, triton.cdiv(seq, block_r) if documents else triton.cdiv(num_chunks, chunks))
    d_raw = torch.empty_like(raw)
    d_g = torch.empty(grid[0] * grid[1], num_experts, dtype=torch.float32, device=raw.device)
    _blockffn_router_bwd_kernel[grid](
        raw, g, doc_pos if documents else raw, chunk_unused, d_weights,
        d_weights if d_probs is None else d_probs.contiguous(), d_losses, losses[2:], d_raw, d_g,
        seq, num_experts, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale,
        HAS_D_PROBS=d_probs is not None, HAS_DOCS=documents, CHUNKS=chunks, BLOCK_R=block_r, BLOCK_J=block_j,
        BLOCK_E=block_e, num_warps=8)
    return d_raw, d_g.sum(0)


class _BlockFFNRouterEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw, g, doc_pos, *settings):
        weights, probs, slot_expert, active_t, losses, chunk_unused = _epilogue_forward(raw, g, doc_pos, *settings)
        ctx.save_for_backward(raw, g, doc_pos, chunk_unused, losses)
        ctx.settings = settings
        ctx.mark_non_differentiable(slot_expert, active_t)
        return weights, probs, slot_expert, active_t.t(), losses[:2]

    @staticmethod
    def backward(ctx, d_weights, d_probs, _slot_expert, _active, d_losses):
        raw, g, doc_pos, chunk_unused, losses = ctx.saved_tensors
        d_losses = raw.new_zeros(2) if d_losses is None else d_losses.contiguous()
        d_weights = torch.zeros_like(raw) if d_weights is None else d_weights.contiguous()
        d_raw, d_g = _epilogue_backward(raw, g, doc_pos, chunk_unused, losses, d_weights, d_probs, d_losses,
                                        *ctx.settings)
        return d_raw, d_g, None, None, None, None, None, None, None, None


# The same kernels as custom ops, for torch.compile. The loss coefficients are not arguments: the op
# computes the unweighted losses and the caller multiplies them, so that a coefficient changed by a
# schedule between steps is a graph input, not a constant baked into the graph.
@torch.library.custom_op("sparta::blockffn_router_epilogue", mutates_args=())
def _epilogue_op(raw: torch.Tensor, g: torch.Tensor, doc_pos: Optional[torch.Tensor], batch: int, seq: int, eps: float,
                 sharpness: float, chunk_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _epilogue_forward(raw, g, doc_pos, batch, seq, eps, sharpness, chunk_size, 1.0, 1.0)


@_epilogue_op.register_fake
def _(raw, g, doc_pos, batch, seq, eps, sharpness, chunk_size):
    num_tokens, num_experts = raw.shape
    documents = doc_pos is not None
    chunk_rows = num_tokens if documents else batch * -(-seq // chunk_size)
    return (torch.empty_like(raw), torch.empty_like(raw), raw.new_empty(raw.shape, dtype=torch.int64),
            raw.new_empty(num_experts, num_tokens, dtype=torch.bool), raw.new_empty(4 if documents else 2),
            raw.new_empty(chunk_rows, num_experts))


@torch.library.custom_op("sparta::blockffn_router_epilogue_backward", mutates_args=())
def _epilogue_backward_op(raw: torch.Tensor, g: torch.Tensor, doc_pos: Optional[torch.Tensor], chunk_unused: torch.Tensor,
                          losses: torch.Tensor, d_weights: torch.Tensor, d_probs: Optional[torch.Tensor],
                          d_losses: torch.Tensor,
                          batch: int, seq: int, eps: float, sharpness: float,
                          chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _epilogue_backward(raw, g, doc_pos, chunk_unused, losses, d_weights.contiguous(), d_probs,
                              d_losses.contiguous(), batch, seq, eps, sharpness, chunk_size, 1.0, 1.0)


@_epilogue_backward_op.register_fake
def _(raw, g, *args):
    return torch.empty_like(raw), torch.empty_like(g)


def _epilogue_op_setup(ctx, inputs, output):
    raw, g, doc_pos, *ctx.settings = inputs
    ctx.save_for_backward(raw, g, doc_pos, output[5], output[4])


def _epilogue_op_backward(ctx, d_weights, d_probs, _slot_expert, _active, d_losses, _chunk_unused):
    raw, g, doc_pos, chunk_unused, losses = ctx.saved_tensors
    d_weights = torch.zeros_like(raw) if d_weights is None else d_weights
    d_losses = raw.new_zeros(losses.shape) if d_losses is None else d_losses
    d_raw, d_g = _epilogue_backward_op(raw, g, doc_pos, chunk_unused, losses, d_weights, d_probs, d_losses[:2],
                                       *ctx.settings)
    return (d_raw, d_g) + (None,) * 6


_epilogue_op.register_autograd(_epilogue_op_backward, setup_context=_epilogue_op_setup)


def blockffn_router_epilogue(raw: torch.Tensor, norm_weight: torch.Tensor, batch_shape: tuple[int, int], *,
                             eps: float, sharpness: float, chunk_size: int, locality_coef: float,
                             chunk_sparsity_coef: float, doc_pos: torch.Tensor | None = None):
    """The BlockFFN router after its linear map, fused (formulas in the module docstring).

    raw [T = batch * seq, E] fp32 router scores, tokens in sequence order; norm_weight [E] fp32 (g);
    doc_pos: None (each sequence is one document) or [batch, seq] int32, each token's position
    inside its document (0 at a document start, +1 per token).
    Returns (weights, probs, slot_expert, active, locality_loss, chunk_sparsity_loss): weights and
    probs [T, E] fp32, slot_expert [T, E] int64 (e or -1), active [T, E] bool (a transposed view of
    an [E, T] tensor, so that `active.t().nonzero()` needs no copy), both losses 0-dim and already
    multiplied by their coefficients. Differentiable in raw and norm_weight through weights, probs
    and the losses.
    """
    batch, seq = batch_shape
    if raw.dim() != 2 or raw.dtype != torch.float32 or raw.shape[0] != batch * seq:
        raise ValueError(f"raw must be fp32 [batch*seq={batch * seq}, experts], got {raw.dtype} {tuple(raw.shape)}")
    if norm_weight.shape != (raw.shape[1],) or norm_weight.dtype != torch.float32:
        raise ValueError(f"norm_weight must be fp32 [{raw.shape[1]}], got {norm_weight.dtype} {tuple(norm_weight.shape)}")
    if doc_pos is not None and (doc_pos.shape != (batch, seq) or doc_pos.dtype != torch.int32):
        raise ValueError(f"doc_pos must be int32 [batch={batch}, seq={seq}], got {doc_pos.dtype} {tuple(doc_pos.shape)}")
    raw, norm_weight = raw.contiguous(), norm_weight.contiguous()
    doc_pos = None if doc_pos is None else doc_pos.contiguous()
    if torch.compiler.is_compiling():
        weights, probs, slot_expert, active_t, losses, _ = _epilogue_op(
            raw, norm_weight, doc_pos, batch, seq, float(eps), float(sharpness), int(chunk_size))
        return weights, probs, slot_expert, active_t.t(), locality_coef * losses[0], chunk_sparsity_coef * losses[1]
    weights, probs, slot_expert, active, losses = _BlockFFNRouterEpilogue.apply(
        raw, norm_weight, doc_pos, batch, seq,
        float(eps), float(sharpness), int(chunk_size), float(locality_coef), float(chunk_sparsity_coef))
    locality_loss, chunk_sparsity_loss = losses.unbind()
    return weights, probs, slot_expert, active, locality_loss, chunk_sparsity_loss
