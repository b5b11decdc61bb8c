"""Block-sparse FlashAttention (forward and backward) in Triton.

FlashAttention-2 as in the Triton fused-attention tutorial, but each program walks the LIST of key
blocks that the `KernelLayout` gives its query block instead of the whole row:

    for each listed key block (full ones first, no element mask; then partial ones, masked):
        S = Q K^T * scale                      (exp2 domain: log2(e) folded into the scale)
        m_new = max(m, rowmax(S));  P = exp2(S - m_new)
        l = l * exp2(m - m_new) + rowsum(P);  acc = acc * exp2(m - m_new) + P V
    O = acc / l,  LSE = (m + log2 l) * ln 2    (a row with no allowed key: O = 0, LSE = -inf)

The backward pass recomputes P from the saved LSE and is deterministic (no atomics). After
`_attn_bwd_delta` (delta = rowsum(O * dO) - dLSE), one launch of `_attn_bwd` runs two kinds of
program side by side:
- key tiles (`_attn_bwd_dkdv`), over the transposed lists of every query head that shares its
  key/value head (GQA without copying K/V): dK and dV;
- query tiles (`_attn_bwd_dq`), over the same key lists as the forward: dQ.

On an H100 (sm_90) at head dim 128 the forward runs `block_sparse_attention_hopper` instead: the
same contract and bits, written in Gluon so that the softmax overlaps the P V product (about
1.05-1.1x this forward). Passing a `config` to `_forward` always runs the Triton kernel.

Tiles come in through TMA tensor descriptors over the [rows, head_dim] view of each tensor, so a
tile index is just a row offset. Programs start in `q_block_order` (longest lists first) so that
rows of very different lengths keep the SMs busy to the end. `block_sparse_attention` is
differentiable: eagerly through an autograd.Function, under `torch.compile` through two
`torch.library` custom ops (one opaque op each way, no graph break).
"""

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import block_sparse_attention_hopper as hopper
from .block_layout import KernelLayout, _describe, _element_mask, _tile_coordinates, launch_order

LOG2E = 1.4426950408889634  # the kernels fold it into the softmax scale to use exp2
_LOG2E = tl.constexpr(LOG2E)  # the same, for use inside kernels
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tile_start(blocks, j, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """First row of tile j of a block list whose blocks are cut into BLOCK // TILE tiles."""
    SPLIT: tl.constexpr = BLOCK // TILE
    return tl.load(blocks + j // SPLIT) * BLOCK + (j % SPLIT) * TILE


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, q_pos, desc_k, desc_v, k_blocks, lo, hi, k_row0, len_q, len_k,
                    qk_scale, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Online softmax over key tiles lo..hi of the list."""
    for j in tl.range(lo, hi):
        start_n = _tile_start(k_blocks, j, BLOCK_K, BLOCK_N)
        k = desc_k.load([k_row0 + start_n, 0])
        qk = tl.dot(q, k.T)
        if MASKED:
            keep = _element_mask(q_pos, start_n + tl.arange(0, BLOCK_N), len_q, len_k, CAUSAL)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing allowed so far keeps m = -inf; shift it by 0 so that P = 0, not NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            qk = qk - m_shift[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_shift = m_ij
            qk = qk * qk_scale - m_shift[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([k_row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


# The forward does not specialise integer sizes (divisibility, ==1): one compiled kernel per tile shape
# and dtype.
_SIZES = ["num_heads", "num_q_blocks", "num_k_blocks", "group", "rows_q", "rows_k", "seqlen_q", "seqlen_k"]


@triton.jit(do_not_specialize=_SIZES)
def _attn_fwd(desc_q, desc_k, desc_v, Out, LSE,
              KV_COUNT, KV_FULL, KV_INDEX, ORDER, CU_Q, CU_K,
              qk_scale, num_heads, num_q_blocks, num_k_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    row, batch, head, q_block, sub, q_row0, k_row0, len_q, len_k = _tile_coordinates(
        tl.program_id(0), tl.program_id(1), ORDER, CU_Q, CU_K, num_heads, num_q_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
        BLOCK_Q // BLOCK_M, VARLEN)
    start_m = q_block * BLOCK_Q + sub * BLOCK_M
    q_pos = start_m + tl.arange(0, BLOCK_M)
    count = tl.load(KV_COUNT + row)
    full = tl.load(KV_FULL + row)
    k_blocks = KV_INDEX + row.to(tl.int64) * num_k_blocks

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = desc_q.load([q_row0 + start_m, 0])
    SPLIT_N: tl.constexpr = BLOCK_K // BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_pos, desc_k, desc_v, k_blocks, 0, full * SPLIT_N,
                                    k_row0, len_q, len_k, qk_scale, BLOCK_K, BLOCK_N, False, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_pos, desc_k, desc_v, k_blocks, full * SPLIT_N,
                                    count * SPLIT_N, k_row0, len_q, len_k, qk_scale, BLOCK_K, BLOCK_N,
                                    True, CAUSAL)

    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    lse = tl.where(alive, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    out_rows = (q_row0 + q_pos).to(tl.int64)
    in_seq = q_pos < len_q
    tl.store(LSE + out_rows, lse, mask=in_seq)
    dims = tl.arange(0, HEAD_DIM)
    tl.store(Out + out_rows[:, None] * HEAD_DIM + dims[None, :], (acc / l_safe[:, None]).to(q.dtype),
             mask=in_seq[:, None])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta(Out, DO, DLSE, DELTA, num_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(O * dO) - dLSE, the row term of dS = P * (dP - delta)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < num_rows
    offsets = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(Out + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1) - tl.load(DLSE + rows, mask=valid, other=0.0), mask=valid)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, q_pos, desc_k, desc_v, k_blocks, lo, hi, k_row0, len_q, len_k,
                       qk_scale, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ += dS K over key tiles lo..hi, with P recomputed from the log2-domain LSE."""
    for j in tl.range(lo, hi):
        start_n = _tile_start(k_blocks, j, BLOCK_K, BLOCK_N)
        k = desc_k.load([k_row0 + start_n, 0])
        v = desc_v.load([k_row0 + start_n, 0])
        p = tl.math.exp2(tl.dot(q, k.T) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(_element_mask(q_pos, start_n + tl.arange(0, BLOCK_N), len_q, len_k, CAUSAL), p, 0.0)
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq(pid, desc_q, desc_k, desc_v, desc_do, LSE, DELTA, DQ, KV_COUNT, KV_FULL, KV_INDEX, ORDER, CU_Q, CU_K,
                 sm_scale, num_heads, num_q_blocks, num_k_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """One query tile's dQ over its key list."""
    row, batch, head, q_block, sub, q_row0, k_row0, len_q, len_k = _tile_coordinates(
        pid, tl.program_id(1), ORDER, CU_Q, CU_K, num_heads, num_q_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
        BLOCK_Q // BLOCK_M, VARLEN)
    start_m = q_block * BLOCK_Q + sub * BLOCK_M
    q_pos = start_m + tl.arange(0, BLOCK_M)
    in_seq = q_pos < len_q
    rows = (q_row0 + q_pos).to(tl.int64)
    q = desc_q.load([q_row0 + start_m, 0])
    do = desc_do.load([q_row0 + start_m, 0])
    delta = tl.load(DELTA + rows, mask=in_seq, other=0.0)
    lse2 = tl.load(LSE + rows, mask=in_seq, other=0.0) * _LOG2E

    count = tl.load(KV_COUNT + row)
    full = tl.load(KV_FULL + row)
    k_blocks = KV_INDEX + row.to(tl.int64) * num_k_blocks
    qk_scale = sm_scale * _LOG2E
    SPLIT_N: tl.constexpr = BLOCK_K // BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, q_pos, desc_k, desc_v, k_blocks, 0, full * SPLIT_N,
                            k_row0, len_q, len_k, qk_scale, BLOCK_K, BLOCK_N, False, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, q_pos, desc_k, desc_v, k_blocks, full * SPLIT_N,
                            count * SPLIT_N, k_row0, len_q, len_k, qk_scale, BLOCK_K, BLOCK_N, True, CAUSAL)
    dims = tl.arange(0, HEAD_DIM)
    tl.store(DQ + rows[:, None] * HEAD_DIM + dims[None, :], (dq * sm_scale).to(q.dtype), mask=in_seq[:, None])


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, k_pos, desc_q, desc_do, LSE, DELTA, q_blocks, lo, hi, q_row0,
                         len_q, len_k, qk_scale, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q over query tiles lo..hi of one query head's list."""
    for j in tl.range(lo, hi):
        start_m = _tile_start(q_blocks, j, BLOCK_Q, BLOCK_M)
        q_pos = start_m + tl.arange(0, BLOCK_M)
        rows = (q_row0 + q_pos).to(tl.int64)
        q = desc_q.load([q_row0 + start_m, 0])
        if MASKED:  # a partial tile may run past the sequence (and the tensor) end
            lse2 = tl.load(LSE + rows, mask=q_pos < len_q, other=0.0) * _LOG2E
        else:
            lse2 = tl.load(LSE + rows) * _LOG2E
        p_t = tl.math.exp2(tl.dot(k, q.T) * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(tl.trans(_element_mask(q_pos, k_pos, len_q, len_k, CAUSAL)), p_t, 0.0)
        do = desc_do.load([q_row0 + start_m, 0])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        if MASKED:
            delta = tl.load(DELTA + rows, mask=q_pos < len_q, other=0.0)
        else:
            delta = tl.load(DELTA + rows)
        ds_t = p_t * (tl.dot(v, do.T) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(pid, desc_q, desc_k, desc_v, desc_do, LSE, DELTA, DK, DV, Q_COUNT, Q_FULL, Q_INDEX, ORDER,
                   CU_Q, CU_K, sm_scale, num_heads, num_q_blocks, num_k_blocks, group, rows_q, rows_k, seqlen_q,
                   seqlen_k, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """One key tile's dK and dV over the transposed lists of every query head that shares its
    key/value head. ORDER runs over (layout batch, kv head, key block)."""
    kv_row, batch, kv_head, k_block, sub, _, k_row0, len_q, len_k = _tile_coordinates(
        pid, tl.program_id(1), ORDER, CU_Q, CU_K, num_heads // group, num_k_blocks, 1, rows_k, rows_k, seqlen_k, seqlen_k,
        BLOCK_K // BLOCK_N, VARLEN)
    if VARLEN:
        q_start = tl.load(CU_Q + batch)
        len_q = tl.load(CU_Q + batch + 1) - q_start
    else:
        q_start = batch * num_heads * rows_q
        len_q = seqlen_q
    start_n = k_block * BLOCK_K + sub * BLOCK_N
    k_pos = start_n + tl.arange(0, BLOCK_N)
    k = desc_k.load([k_row0 + start_n, 0])
    v = desc_v.load([k_row0 + start_n, 0])
    qk_scale = sm_scale * _LOG2E
    SPLIT_M: tl.constexpr = BLOCK_Q // BLOCK_M
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    layout_batch = kv_row // ((num_heads // group) * num_k_blocks)
    for g in range(group):
        head = kv_head * group + g
        row = (layout_batch * num_heads + head) * num_k_blocks + k_block
        count = tl.load(Q_COUNT + row)
        full = tl.load(Q_FULL + row)
        q_blocks = Q_INDEX + row.to(tl.int64) * num_q_blocks
        q_row0 = q_start + head * rows_q
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_pos, desc_q, desc_do, LSE, DELTA, q_blocks,
                                      0, full * SPLIT_M, q_row0, len_q, len_k, qk_scale,
                                      BLOCK_Q, BLOCK_M, False, CAUSAL)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_pos, desc_q, desc_do, LSE, DELTA, q_blocks,
                                      full * SPLIT_M, count * SPLIT_M, q_row0, len_q, len_k, qk_scale,
                                      BLOCK_Q, BLOCK_M, True, CAUSAL)
    rows = (k_row0 + k_pos).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    in_seq = (k_pos < len_k)[:, None]
    tl.store(DK + rows[:, None] * HEAD_DIM + dims[None, :], (dk * sm_scale).to(k.dtype), mask=in_seq)
    tl.store(DV + rows[:, None] * HEAD_DIM + dims[None, :], dv.to(v.dtype), mask=in_seq)


# Unlike the forward, the backward specialises its integer sizes (divisible by 16, equal to 1): a
# compile per such pattern, but on H100 the dK/dV programs spill 12 registers instead of 70 (one
# query head per key/value head folds the GQA loop) and D64 runs 4% faster.
@triton.jit
def _attn_bwd(dq_desc_q, dq_desc_k, dq_desc_v, dq_desc_do, kv_desc_q, kv_desc_k, kv_desc_v, kv_desc_do,
              LSE, DELTA, DQ, DK, DV, KV_COUNT, KV_FULL, KV_INDEX, Q_ORDER, Q_COUNT, Q_FULL, Q_INDEX, KV_ORDER,
              CU_Q, CU_K, sm_scale, num_dkdv_programs,
              num_heads, num_q_blocks, num_k_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DQ_BLOCK_M: tl.constexpr, DQ_BLOCK_N: tl.constexpr,
              KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """The whole backward in one launch: the first programs are key tiles (dK, dV), the rest query
    tiles (dQ). Sharing one grid keeps every SM busy until both are done; measured on H100 (D128,
    N16k): 7% faster than two launches."""
    pid = tl.program_id(0)
    if pid < num_dkdv_programs:
        _attn_bwd_dkdv(pid, kv_desc_q, kv_desc_k, kv_desc_v, kv_desc_do, LSE, DELTA, DK, DV, Q_COUNT, Q_FULL,
                       Q_INDEX, KV_ORDER, CU_Q, CU_K, sm_scale, num_heads, num_q_blocks, num_k_blocks, group,
                       rows_q, rows_k, seqlen_q, seqlen_k, BLOCK_Q, BLOCK_K, KV_BLOCK_M, KV_BLOCK_N, HEAD_DIM, CAUSAL, VARLEN)
    else:
        _attn_bwd_dq(pid - num_dkdv_programs, dq_desc_q, dq_desc_k, dq_desc_v, dq_desc_do, LSE, DELTA, DQ,
                     KV_COUNT, KV_FULL, KV_INDEX, Q_ORDER, CU_Q, CU_K, sm_scale, num_heads, num_q_blocks,
                     num_k_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
                     BLOCK_Q, BLOCK_K, DQ_BLOCK_M, DQ_BLOCK_N, HEAD_DIM, CAUSAL, VARLEN)


# ----------------------------------------------------------------------------------------------
# Launch configurations and autotuning
# ----------------------------------------------------------------------------------------------

class Config(NamedTuple):
    """Forward tile shape as a split of the layout block (tile = block // split), warps and
    pipeline depth: split_m splits the query block (rows per program), split_n the key block (keys
    per loop step)."""

    split_m: int
    split_n: int
    num_warps: int
    num_stages: int


class BackwardConfig(NamedTuple):
    """Backward tile shapes, one launch for both program kinds (so warps and stages are shared).

    dQ programs: dq_split_m splits the query block (rows per program), dq_split_n the key block
    (keys per loop step). dK/dV programs: dkdv_split_n splits the key block (keys per program),
    dkdv_split_m the query block (query rows per loop step).
    """

    dq_split_m: int
    dq_split_n: int
    dkdv_split_m: int
    dkdv_split_n: int
    num_warps: int
    num_stages: int


# Tuned on one H100 (bf16, 128x128 blocks; benchmarks/attention.py --tune), per pass and head dim
# (head dims below 64 use the 64 entry). Candidates are those that compile without register
# spills in the hot loop, plus FlexAttention's H100 choices.
TUNED_CONFIGS = {
    ("fwd", 64): Config(1, 1, 4, 3),
    ("fwd", 128): Config(1, 1, 8, 2),
    ("bwd", 64): BackwardConfig(2, 2, 2, 2, 4, 3),
    ("bwd", 128): BackwardConfig(1, 1, 2, 1, 8, 2),
}
CANDIDATE_CONFIGS = {
    ("fwd", 64): [Config(1, 1, 8, 3), Config(1, 1, 4, 3), Config(1, 1, 8, 2), Config(1, 2, 8, 3), Config(1, 2, 8, 4)],
    ("fwd", 128): [Config(1, 2, 8, 3), Config(1, 1, 8, 2), Config(1, 1, 8, 3), Config(1, 2, 8, 4)],
    ("bwd", 64): [BackwardConfig(2, 2, 2, 2, 4, 3), BackwardConfig(1, 2, 2, 1, 8, 3), BackwardConfig(2, 2, 2, 1, 8, 3)],
    ("bwd", 128): [BackwardConfig(1, 1, 2, 1, 8, 2), BackwardConfig(1, 2, 2, 1, 8, 2), BackwardConfig(1, 2, 2, 1, 8, 3),
                   BackwardConfig(2, 2, 4, 1, 8, 3)],
}

_AUTOTUNED: dict[tuple, tuple] = {}


def _config(kind: str, q: torch.Tensor, block_q: int, block_k: int, launch):
    """The tuned config of this pass ("fwd" or "bwd"), or with SPARTA_ATTENTION_AUTOTUNE=1 the
    fastest candidate on the first call for this (pass, head dim, dtype, block sizes, GPU), cached
    for the process.

    Under the Triton interpreter (CPU tests) tiles are whole blocks: there each program costs time.
    """
    table_key = (kind, 128 if q.shape[-1] > 64 else 64)
    if q.device.type != "cuda":
        tuned = TUNED_CONFIGS[table_key]
        return tuned._replace(**{name: 1 for name in tuned._fields if "split" in name}, num_warps=4, num_stages=1)
    if os.environ.get("SPARTA_ATTENTION_AUTOTUNE") != "1":
        return _fit(TUNED_CONFIGS[table_key], block_q, block_k)
    key = (kind, q.shape[-1], q.dtype, block_q, block_k, torch.cuda.get_device_name(q.device))
    if key not in _AUTOTUNED:
        candidates = dict.fromkeys(_fit(c, block_q, block_k) for c in CANDIDATE_CONFIGS[table_key])
        times = {c: triton.testing.do_bench(lambda c=c: launch(c), return_mode="median") for c in candidates}
        _AUTOTUNED[key] = min(times, key=times.get)
    return _AUTOTUNED[key]


def _fit(config, block_q: int, block_k: int):
    """Clamp the splits so that tiles keep at least 16 rows (tl.dot's minimum) for small blocks."""
    limits = {"m": block_q // 16, "n": block_k // 16}
    return config._make(min(value, limits[name[-1]]) if "split" in name else value
                        for name, value in zip(config._fields, config))


def _descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A TMA descriptor over the [rows, head_dim] view of a contiguous [B, H, N, D] tensor."""
    view = x.view(-1, x.shape[-1])
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [block_rows, x.shape[-1]])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

class _Problem(NamedTuple):
    """What every launch needs besides tensors: the layout's scalars and the grid's batch repeat."""

    block_q: int
    block_k: int
    seqlen_q: int
    seqlen_k: int
    causal: bool
    varlen: bool


def _common_args(q, k, layout_batch, problem: _Problem, num_q_blocks, num_k_blocks):
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    batch_repeat = 1 if problem.varlen else q.shape[0] // layout_batch
    scalars = (heads, num_q_blocks, num_k_blocks, group, q.shape[2], k.shape[2], problem.seqlen_q, problem.seqlen_k)
    return scalars, batch_repeat


def _meta(problem: _Problem, config: Config, head_dim: int):
    return dict(BLOCK_Q=problem.block_q, BLOCK_K=problem.block_k,
                BLOCK_M=problem.block_q // config.split_m, BLOCK_N=problem.block_k // config.split_n,
                HEAD_DIM=head_dim, CAUSAL=problem.causal, VARLEN=problem.varlen,
                num_warps=config.num_warps, num_stages=config.num_stages)


def _forward(q, k, v, kv_count, kv_full_count, kv_index, q_block_order, cu_seqlens_q, cu_seqlens_k,
             problem: _Problem, sm_scale: float, config: Config | None = None):
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    layout_batch, _, num_q_blocks = kv_count.shape
    scalars, batch_repeat = _common_args(q, k, layout_batch, problem, num_q_blocks, kv_index.shape[-1])
    cu_q, cu_k = _cu_or_any(cu_seqlens_q, kv_count), _cu_or_any(cu_seqlens_k, kv_count)
    if config is None and hopper.applies(q, problem.block_q, problem.block_k):
        hopper.forward(q, k, v, o, lse, (kv_count, kv_full_count, kv_index, q_block_order), cu_q, cu_k, scalars,
                       batch_repeat, problem.block_q, problem.block_k, problem.causal, problem.varlen, sm_scale * LOG2E)
        return o, lse

    def launch(cfg: Config):
        meta = _meta(problem, cfg, q.shape[-1])
        grid = (q_block_order.numel() * cfg.split_m, batch_repeat)
        _attn_fwd[grid](_descriptor(q, meta["BLOCK_M"]), _descriptor(k, meta["BLOCK_N"]),
                        _descriptor(v, meta["BLOCK_N"]), o, lse,
                        kv_count, kv_full_count, kv_index, q_block_order, cu_q, cu_k,
                        sm_scale * LOG2E, *scalars, **meta)

    launch(config or _config("fwd", q, problem.block_q, problem.block_k, launch))
    return o, lse


def _backward(do, dlse, q, k, v, o, lse, kv_count, kv_full_count, kv_index, q_block_order,
              q_count, q_full_count, q_index, cu_seqlens_q, cu_seqlens_k, problem: _Problem, sm_scale: float,
              config: BackwardConfig | None = None):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    head_dim = q.shape[-1]
    _attn_bwd_delta[(triton.cdiv(lse.numel(), 64),)](o, do, dlse, delta, lse.numel(), HEAD_DIM=head_dim, BLOCK=64)
    layout_batch, _, num_q_blocks = kv_count.shape
    num_k_blocks = kv_index.shape[-1]
    scalars, batch_repeat = _common_args(q, k, layout_batch, problem, num_q_blocks, num_k_blocks)
    cu_q, cu_k = _cu_or_any(cu_seqlens_q, kv_count), _cu_or_any(cu_seqlens_k, kv_count)
    # dK/dV programs, one per (layout batch, kv head, key block), longest summed query lists first.
    kv_order = launch_order(q_count, num_q_blocks, group=q.shape[1] // k.shape[1])

    def launch(cfg: BackwardConfig):
        dq_m, dq_n = problem.block_q // cfg.dq_split_m, problem.block_k // cfg.dq_split_n
        kv_m, kv_n = problem.block_q // cfg.dkdv_split_m, problem.block_k // cfg.dkdv_split_n
        num_dkdv_programs = kv_order.numel() * cfg.dkdv_split_n
        grid = (num_dkdv_programs + q_block_order.numel() * cfg.dq_split_m, batch_repeat)
        _attn_bwd[grid](_descriptor(q, dq_m), _descriptor(k, dq_n), _descriptor(v, dq_n), _descriptor(do, dq_m),
                        _descriptor(q, kv_m), _descriptor(k, kv_n), _descriptor(v, kv_n), _descriptor(do, kv_m),
                        lse, delta, dq, dk, dv, kv_count, kv_full_count, kv_index, q_block_order,
                        q_count, q_full_count, q_index, kv_order, cu_q, cu_k, sm_scale, num_dkdv_programs, *scalars,
                        BLOCK_Q=problem.block_q, BLOCK_K=problem.block_k, DQ_BLOCK_M=dq_m, DQ_BLOCK_N=dq_n,
                        KV_BLOCK_M=kv_m, KV_BLOCK_N=kv_n, HEAD_DIM=head_dim, CAUSAL=problem.causal,
                        VARLEN=problem.varlen, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    launch(config or _config("bwd", q, problem.block_q, problem.block_k, launch))
    return dq, dk, dv


def _cu_or_any(cu_seqlens, int32_tensor):
    """The kernels read cu_seqlens only when VARLEN; otherwise any int32 pointer will do."""
    return cu_seqlens if cu_seqlens is not None else int32_tensor


# ----------------------------------------------------------------------------------------------
# Autograd and the public entry point. Eager calls use a plain autograd.Function; under
# torch.compile the same kernels are two custom ops (opaque to the compiler, no graph break).
# torch.library's Python dispatch costs 0.1-0.4 ms of CPU per call, more than the GPU time of a
# sparse forward, so eager calls skip it.
# ----------------------------------------------------------------------------------------------

def _layout_args(layout: KernelLayout):
    tensors = (layout.kv_count, layout.kv_full_count, layout.kv_index, layout.q_block_order,
               layout.q_count, layout.q_full_count, layout.q_index, layout.cu_seqlens_q, layout.cu_seqlens_k)
    scalars = (layout.block_q, layout.block_k, layout.seqlen_q, layout.seqlen_k, layout.causal)
    return tensors, scalars


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: KernelLayout, sm_scale: float):
        problem = _Problem(*_layout_args(layout)[1], layout.is_varlen)
        o, lse = _forward(q, k, v, layout.kv_count, layout.kv_full_count, layout.kv_index, layout.q_block_order,
                          layout.cu_seqlens_q, layout.cu_seqlens_k, problem, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.problem, ctx.sm_scale = layout, problem, sm_scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), dlse.contiguous(), q, k, v, o, lse, *_layout_args(ctx.layout)[0],
                               ctx.problem, ctx.sm_scale)
        return dq, dk, dv, None, None


@torch.library.custom_op("sparta::block_sparse_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kv_count: torch.Tensor, kv_full_count: torch.Tensor, kv_index: torch.Tensor,
            q_block_order: torch.Tensor, q_count: torch.Tensor, q_full_count: torch.Tensor,
            q_index: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            block_q: int, block_k: int, seqlen_q: int, seqlen_k: int, causal: bool,
            sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _Problem(block_q, block_k, seqlen_q, seqlen_k, causal, cu_seqlens_q is not None)
    return _forward(q, k, v, kv_count, kv_full_count, kv_index, q_block_order, cu_seqlens_q, cu_seqlens_k,
                    problem, sm_scale)


@_fwd_op.register_fake
def _(q, *args):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparta::block_sparse_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor,
            kv_count: torch.Tensor, kv_full_count: torch.Tensor, kv_index: torch.Tensor,
            q_block_order: torch.Tensor, q_count: torch.Tensor, q_full_count: torch.Tensor,
            q_index: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            block_q: int, block_k: int, seqlen_q: int, seqlen_k: int, causal: bool,
            sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _Problem(block_q, block_k, seqlen_q, seqlen_k, causal, cu_seqlens_q is not None)
    return _backward(do.contiguous(), dlse.contiguous(), q, k, v, o, lse, kv_count, kv_full_count, kv_index,
                     q_block_order, q_count, q_full_count, q_index, cu_seqlens_q, cu_seqlens_k, problem, sm_scale)


@_bwd_op.register_fake
def _(do, dlse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, *output, *inputs[3:12])
    ctx.scalars = inputs[12:]


def _fwd_op_backward(ctx, do, dlse):
    q, k, v, o, lse, *layout_tensors = ctx.saved_tensors
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = _bwd_op(do, dlse, q, k, v, o, lse, *layout_tensors, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 15


_fwd_op.register_autograd(_fwd_op_backward, setup_context=_setup_context)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KernelLayout,
                           sm_scale: float | None = None, return_lse: bool = False):
    """Attention of q [B, Hq, Nq, D] over k, v [B, Hkv, Nk, D] restricted to the layout's blocks.

    Differentiable in q, k, v (and through the returned LSE). Hq must be a multiple of Hkv (query
    heads h*Hq/Hkv .. share key/value head h). For a packed variable-length layout the tensors are
    [1, H, total, D]. Returns O (q's dtype), and with `return_lse` the natural-log LSE, fp32
    [B, Hq, Nq]; a query with no allowed key gets O = 0 and LSE = -inf.
    """
    _check_inputs(q, k, v, layout)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale: expected a positive float, got {sm_scale}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.compiler.is_compiling():
        tensors, scalars = _layout_args(layout)
        o, lse = _fwd_op(q, k, v, *tensors, *scalars, sm_scale)
    else:
        o, lse = _BlockSparseAttention.apply(q, k, v, layout, sm_scale)
    return (o, lse) if return_lse else o


def check_attention_tensors(q, others: dict, reference: str) -> None:
    """What every attention kernel asks of q and the tensors beside it (`others`, by name): 4-D
    [B, H, N, D], q's dtype and device, CUDA (or the interpreter), a supported head dim. `reference`
    names the pure-torch function that computes the same anywhere."""
    for name, x in (("q", q), *others.items()):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, N, D], got {_describe(x)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: expected float16 or bfloat16, got {q.dtype}")
    for name, x in others.items():
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from q's {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q on {q.device}")
    if q.device.type == "cuda":
        if q.dtype == torch.float32:
            raise ValueError("q: float32 runs only under the Triton interpreter (CPU tests); use float16/bfloat16")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q: on {q.device}; the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 "
                         f"({reference} computes the same on any device)")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {q.shape[-1]} not supported, expected one of {SUPPORTED_HEAD_DIMS}")


def _check_inputs(q, k, v, layout: KernelLayout):
    check_attention_tensors(q, {"k": k, "v": v}, "block_sparse_attention_reference")
    if not isinstance(layout, KernelLayout):
        raise ValueError(f"layout: expected a KernelLayout (build_kernel_layout), got {type(layout).__name__}")
    if layout.kv_count.device != q.device:
        raise ValueError(f"layout: on {layout.kv_count.device}, q on {q.device}")
    head_dim = q.shape[-1]
    if k.shape != v.shape or k.shape[-1] != head_dim or k.shape[0] != q.shape[0]:
        raise ValueError(f"k, v: expected equal shapes [{q.shape[0]}, Hkv, Nk, {head_dim}], "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: {k.shape[1]} key/value heads do not divide q's {q.shape[1]} heads")
    if layout.heads != q.shape[1]:
        raise ValueError(f"layout: built for {layout.heads} heads, q has {q.shape[1]}")
    if layout.is_varlen:
        if q.shape[0] != 1 or q.shape[2] < layout.seqlen_q or k.shape[2] < layout.seqlen_k:
            raise ValueError(f"q, k: a variable-length layout wants packed [1, H, total, D] tensors with "
                             f"total >= the longest sequence ({layout.seqlen_q}, {layout.seqlen_k}), "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    else:
        if layout.batch not in (1, q.shape[0]):
            raise ValueError(f"layout: batch {layout.batch}, expected 1 or q's batch {q.shape[0]}")
        if (layout.seqlen_q, layout.seqlen_k) != (q.shape[2], k.shape[2]):
            raise ValueError(f"layout: built for seqlen_q={layout.seqlen_q}, seqlen_k={layout.seqlen_k}, "
                             f"got q with {q.shape[2]} and k with {k.shape[2]} positions")

