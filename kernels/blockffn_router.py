"""BlockFFN router epilogue in one Triton kernel per pass: raw scores -> expert weights, routing
distribution, active mask and both BlockFFN losses.

The torch formulas (`sparta.moe.routers.BlockFFNRouter`, `sparta.moe.losses`) take about 25 small
ops on [T, E] forward and as many backward; at low activation rates the layer's time is then the
host launching them, not the GPU. Here, per token t of sequence b and expert e (raw = router
scores s, fp32):

    r = relu(s), n = r / sqrt(mean_e r^2 + eps), weights = n * g, p = n / (sum_e n + 1e-5),
    active = n > 0 (also as slot_expert: e or -1),
    locality = coef_l * mean_{b, t >= 1, e} BCE_logits(alpha * s[t-1], sigmoid(alpha * s[t])),
    chunk    = coef_c * (1 - mean_{b, chunk, e} prod_{t in chunk} (1 - p + 1e-5)).

A program owns whole loss chunks of one sequence, so each chunk's product is finished in
registers; the locality pair (t-1, t) reads the previous row again (an L2 hit). Every program
writes its share of both losses, already scaled (program 0 adds the chunk loss's "1 -"), so one
torch sum finishes them, deterministically. The backward recomputes the forward from the raw
scores and the saved chunk products, and returns d raw and d g.
"""
import torch
import triton
import triton.language as tl

from .moe_permute import _interpreting


@triton.jit
def _tile(raw_ptr, b, chunks, j0, j, e, S, E, chunk_size, num_chunks, eps):
    """Offsets, mask and the forward values of the rows j0 + j of `chunks` (sequence b)."""
    s = chunks[:, None] * chunk_size + j0 + j[None, :]                           # [C, J] position in sequence
    row_ok = (chunks < num_chunks)[:, None] & ((j0 + j) < chunk_size)[None, :] & (s < S)
    mask = row_ok[:, :, None] & (e < E)[None, None, :]
    offs = ((b * S + s).to(tl.int64) * E)[:, :, None] + e[None, None, :]
    raw = tl.load(raw_ptr + offs, mask=mask, other=0.0)
    r = tl.maximum(raw, 0.0)
    inv_rms = 1.0 / tl.sqrt(tl.sum(r * r, axis=2) / E + eps)
    n = r * inv_rms[:, :, None]
    denom = tl.sum(n, axis=2) + 1e-5
    p = n / denom[:, :, None]
    return s, mask, offs, raw, r, inv_rms, n, denom, p


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x as torch.log1p (Goldberg's correction of the rounded 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _bce_with_logits(x, y):
    return tl.maximum(x, 0.0) - x * y + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _blockffn_router_fwd_kernel(
    raw_ptr, g_ptr, weights_ptr, probs_ptr, slot_expert_ptr, active_t_ptr, chunk_unused_ptr, partial_ptr,
    T, S, E, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale, chunk_coef,
    CHUNKS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b, chunk_block = tl.program_id(0), tl.program_id(1)
    chunks = chunk_block * CHUNKS + tl.arange(0, CHUNKS)
    j = tl.arange(0, BLOCK_J)
    e = tl.arange(0, BLOCK_E)
    g = tl.load(g_ptr + e, mask=e < E, other=0.0)
    log_unused = tl.zeros((CHUNKS, BLOCK_E), dtype=tl.float32)
    locality = tl.zeros((CHUNKS, BLOCK_J, BLOCK_E), dtype=tl.float32)
    for j0 in range(0, chunk_size, BLOCK_J):
        s, mask, offs, raw, r, inv_rms, n, denom, p = _tile(raw_ptr, b, chunks, j0, j, e, S, E, chunk_size,
                                                             num_chunks, eps)
        tl.store(weights_ptr + offs, n * g[None, None, :], mask=mask)
        tl.store(probs_ptr + offs, p, mask=mask)
        active = n > 0
        tl.store(slot_expert_ptr + offs, tl.where(active, e[None, None, :], -1).to(tl.int64), mask=mask)
        token = (b * S + s).to(tl.int64)
        tl.store(active_t_ptr + e.to(tl.int64)[None, None, :] * T + token[:, :, None], active.to(tl.int8), mask=mask)
        log_unused += tl.sum(tl.where(mask, _log1p(1e-5 - p), 0.0), axis=1)
        has_prev = mask & (s >= 1)[:, :, None]
        previous = tl.load(raw_ptr + offs - E, mask=has_prev, other=0.0)
        bce = _bce_with_logits(sharpness * previous, tl.sigmoid(sharpness * raw))
        locality += tl.where(has_prev, bce, 0.0)
    chunk_mask = (chunks < num_chunks)[:, None] & (e < E)[None, :]
    unused = tl.where(chunk_mask, tl.exp(log_unused), 0.0)
    chunk_row = (b * num_chunks + chunks).to(tl.int64)
    tl.store(chunk_unused_ptr + chunk_row[:, None] * E + e[None, :], unused, mask=chunk_mask)
    pid = b * tl.num_programs(1) + chunk_block
    first = (pid == 0).to(tl.float32)
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(tl.sum(locality, axis=2), axis=1), axis=0) * locality_scale)
    tl.store(partial_ptr + 2 * pid + 1, chunk_coef * first - tl.sum(tl.sum(unused, axis=1), axis=0) * chunk_scale)


@triton.jit
def _blockffn_router_bwd_kernel(
    raw_ptr, g_ptr, chunk_unused_ptr, d_weights_ptr, d_probs_ptr, d_losses_ptr, d_raw_ptr, d_g_ptr,
    S, E, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale,
    HAS_D_PROBS: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b, chunk_block = tl.program_id(0), tl.program_id(1)
    chunks = chunk_block * CHUNKS + tl.arange(0, CHUNKS)
    j = tl.arange(0, BLOCK_J)
    e = tl.arange(0, BLOCK_E)
    g = tl.load(g_ptr + e, mask=e < E, other=0.0)
    d_locality = tl.load(d_losses_ptr) * locality_scale  # d loss / d (one BCE term)
    d_chunk = tl.load(d_losses_ptr + 1) * chunk_scale    # -d loss / d (one chunk product)
    chunk_mask = (chunks < num_chunks)[:, None] & (e < E)[None, :]
    chunk_row = (b * num_chunks + chunks).to(tl.int64)
    unused = tl.load(chunk_unused_ptr + chunk_row[:, None] * E + e[None, :], mask=chunk_mask, other=0.0)
    d_g = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for j0 in range(0, chunk_size, BLOCK_J):
        s, mask, offs, raw, r, inv_rms, n, denom, p = _tile(raw_ptr, b, chunks, j0, j, e, S, E, chunk_size,
                                                             num_chunks, eps)
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
        following = tl.load(raw_ptr + offs + E, mask=has_next, other=0.0)
        d_raw += tl.where(has_next, d_locality * sharpness * (sig - tl.sigmoid(sharpness * following)), 0.0)
        has_prev = mask & (s >= 1)[:, :, None]
        previous = tl.load(raw_ptr + offs - E, mask=has_prev, other=0.0)
        d_raw += tl.where(has_prev, -d_locality * sharpness * sharpness * previous * sig * (1.0 - sig), 0.0)
        tl.store(d_raw_ptr + offs, d_raw, mask=mask)
    pid = b * tl.num_programs(1) + chunk_block
    tl.store(d_g_ptr + pid.to(tl.int64) * E + e, d_g, mask=e < E)


def _blocks(chunk_size: int, num_chunks: int, num_experts: int, elements: int) -> tuple[int, int, int]:
    """(chunks per program, rows per step, expert columns): about `elements` values per [rows, E]
    tile on the GPU; in the interpreter, whose cost is per program, large tiles."""
    block_e = triton.next_power_of_2(num_experts)
    budget = 1 << 15 if _interpreting() else elements
    block_j = max(1, min(triton.next_power_of_2(chunk_size), budget // block_e))
    chunks = 1
    if block_j >= chunk_size:  # whole chunks fit a step: several per program
        chunks = max(1, min(budget // (block_j * block_e), triton.next_power_of_2(num_chunks)))
    return chunks, block_j, block_e


class _BlockFFNRouterEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw, g, batch, seq, eps, sharpness, chunk_size, locality_coef, chunk_coef):
        num_tokens, num_experts = raw.shape
        num_chunks = -(-seq // chunk_size)
        locality_scale = locality_coef / (batch * (seq - 1) * num_experts) if seq > 1 else 0.0
        chunk_scale = chunk_coef / (batch * num_chunks * num_experts)
        chunks, block_j, block_e = _blocks(chunk_size, num_chunks, num_experts, elements=4096)
        grid = (batch, triton.cdiv(num_chunks, chunks))
        weights, probs = torch.empty_like(raw), torch.empty_like(raw)
        slot_expert = torch.empty(raw.shape, dtype=torch.int64, device=raw.device)
        active_t = torch.empty(num_experts, num_tokens, dtype=torch.bool, device=raw.device)
        chunk_unused = torch.empty(batch * num_chunks, num_experts, dtype=torch.float32, device=raw.device)
        partial = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=raw.device)
        _blockffn_router_fwd_kernel[grid](
            raw, g, weights, probs, slot_expert, active_t.view(torch.int8), chunk_unused, partial,
            num_tokens, seq, num_experts, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale,
            chunk_coef, CHUNKS=chunks, BLOCK_J=block_j, BLOCK_E=block_e, num_warps=8)
        ctx.save_for_backward(raw, g, chunk_unused)
        ctx.sizes = (batch, seq, eps, sharpness, chunk_size, locality_scale, chunk_scale)
        ctx.mark_non_differentiable(slot_expert, active_t)
        return weights, probs, slot_expert, active_t.t(), partial.sum(0)

    @staticmethod
    def backward(ctx, d_weights, d_probs, _slot_expert, _active, d_losses):
        raw, g, chunk_unused = ctx.saved_tensors
        batch, seq, eps, sharpness, chunk_size, locality_scale, chunk_scale = ctx.sizes
        num_experts = raw.shape[1]
        num_chunks = chunk_unused.shape[0] // batch
        d_losses = raw.new_zeros(2) if d_losses is None else d_losses.contiguous()
        d_weights = torch.zeros_like(raw) if d_weights is None else d_weights.contiguous()
        chunks, block_j, block_e = _blocks(chunk_size, num_chunks, num_experts, elements=2048)
        grid = (batch, triton.cdiv(num_chunks, chunks))
        d_raw = torch.empty_like(raw)
        d_g = torch.empty(grid[0] * grid[1], num_experts, dtype=torch.float32, device=raw.device)
        _blockffn_router_bwd_kernel[grid](
            raw, g, chunk_unused, d_weights, d_weights if d_probs is None else d_probs.contiguous(),
            d_losses, d_raw, d_g,
            seq, num_experts, chunk_size, num_chunks, eps, sharpness, locality_scale, chunk_scale,
            HAS_D_PROBS=d_probs is not None, CHUNKS=chunks, BLOCK_J=block_j, BLOCK_E=block_e, num_warps=8)
        return d_raw, d_g.sum(0), None, None, None, None, None, None, None


def blockffn_router_epilogue(raw: torch.Tensor, norm_weight: torch.Tensor, batch_shape: tuple[int, int], *,
                             eps: float, sharpness: float, chunk_size: int, locality_coef: float,
                             chunk_sparsity_coef: float):
    """The BlockFFN router after its linear map, fused (formulas in the module docstring).

    raw [T = batch * seq, E] fp32 router scores, tokens in sequence order; norm_weight [E] fp32 (g).
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
    weights, probs, slot_expert, active, losses = _BlockFFNRouterEpilogue.apply(
        raw.contiguous(), norm_weight.contiguous(), batch, seq, float(eps), float(sharpness), int(chunk_size),
        float(locality_coef), float(chunk_sparsity_coef))
    locality_loss, chunk_sparsity_loss = losses.unbind()
    return weights, probs, slot_expert, active, locality_loss, chunk_sparsity_loss
