"""Attention probability mass per (query block, key block), in Triton, without an N x N tensor.

For q [B, H, Nq, D] and k [B, Hkv, Nk, D] the result is, per head, fp32 [Qb, Kb]:

    mass[i, j] = sum over the queries r of block i and the keys c of block j of softmax(q k^T * scale)[r, c]

where each row's softmax may be taken apart within each region of key blocks (`region_starts`;
SparseD ranks prompt and answer apart). It is what SparseD's switch step and the pattern search
rank blocks by. One program owns one query block (BLOCK_M = block_q rows) at a time and makes two
passes over each region's keys:

    pass 1:  m = rowmax(Q K^T) * scale                   (exp2 domain: log2(e) folded into the scale)
    pass 2:  for each key block j:  t_j = rowsum(exp2(Q K_j^T * scale - m));  l += t_j;  t_j -> scratch
    then:    mass[i, j] = sum_r t_j[r] / l[r]            (t read back from scratch)

So every exponential is taken once (pass 1 is matmul and max only), the same exp count and matmul
FLOPs as a flash-attention forward (Q K^T twice instead of Q K^T and P V). The per-row sums t_j
must wait for the row's normaliser l, so they go to a scratch of BLOCK_M x Kb floats per program;
the grid is persistent (a fixed number of programs looping over the query blocks), so the scratch
is bounded by the number of programs, not by heads or N: memory is q, k, the output and
programs x BLOCK_M x Kb floats (17 MB at Kb = 256 on an H100).

Conventions follow `block_sparse_attention`: GQA (query heads h*H/Hkv.. share key head h), causal
means query position >= key position from the sequence start, variable-length sequences come packed
as [1, H, total, D] with cu_seqlens, tiles come in through TMA descriptors. `block_mass_reference`
(kernels/attention_reference.py) computes the same in torch.
"""

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .block_layout import _describe, _sequence_rows
from .block_sparse_attention import LOG2E, SUPPORTED_HEAD_DIMS, check_attention_tensors

SUPPORTED_BLOCK_Q = (16, 32, 64, 128)  # a program's rows are one query block


@triton.jit
def _allowed(q_pos, k_pos, k_hi, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a masked tile count: keys before the region's end, and causal."""
    keep = (k_pos < k_hi)[None, :]
    if CAUSAL:
        keep = keep & (q_pos[:, None] >= k_pos[None, :])
    return keep


@triton.jit
def _row_max(m_i, q, q_pos, desc_k, k_row0, kb_lo, kb_hi, k_hi,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Pass 1 over key blocks kb_lo..kb_hi: the running row max of Q K^T (unscaled, no exp)."""
    for kb in tl.range(kb_lo, kb_hi):
        for s in tl.static_range(BLOCK_K // BLOCK_N):
            start_n = kb * BLOCK_K + s * BLOCK_N
            qk = tl.dot(q, desc_k.load([k_row0 + start_n, 0]).T)
            if MASKED:
                qk = tl.where(_allowed(q_pos, start_n + tl.arange(0, BLOCK_N), k_hi, CAUSAL), qk, float("-inf"))
            m_i = tl.maximum(m_i, tl.max(qk, 1))
    return m_i


@triton.jit
def _block_sums(l_i, q, q_pos, m_i, desc_k, k_row0, kb_lo, kb_hi, k_hi, scratch, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Pass 2 over key blocks kb_lo..kb_hi: per block the row sums t of exp2(S - m) to scratch, and l."""
    for kb in tl.range(kb_lo, kb_hi):
        t = tl.zeros([BLOCK_M], tl.float32)
        for s in tl.static_range(BLOCK_K // BLOCK_N):
            start_n = kb * BLOCK_K + s * BLOCK_N
            qk = tl.dot(q, desc_k.load([k_row0 + start_n, 0]).T) * qk_scale - m_i[:, None]
            if MASKED:
                qk = tl.where(_allowed(q_pos, start_n + tl.arange(0, BLOCK_N), k_hi, CAUSAL), qk, float("-inf"))
            t += tl.sum(tl.math.exp2(qk), 1)
        l_i += t
        tl.store(scratch + kb * BLOCK_M + tl.arange(0, BLOCK_M), t)
    return l_i


_SIZES = ["batch", "num_heads", "group", "num_q_blocks", "num_k_blocks", "num_regions", "rows_q", "rows_k",
          "seqlen_q", "seqlen_k"]


@triton.jit(do_not_specialize=_SIZES)
def _block_mass(desc_q, desc_k, Out, Scratch, REGIONS, CU_Q, CU_K, qk_scale,
                batch, num_heads, group, num_q_blocks, num_k_blocks, num_regions, rows_q, rows_k, seqlen_q, seqlen_k,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                CHUNK: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """Persistent: program p takes work items p, p + programs, ...; an item is one (batch, head,
    query block), query blocks of one head consecutive (so programs running together share its K in
    L2), under CAUSAL the last query blocks (longest rows) first."""
    scratch = Scratch + tl.program_id(0).to(tl.int64) * num_k_blocks * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    for work in range(tl.program_id(0), batch * num_heads * num_q_blocks, tl.num_programs(0)):
        q_block = work % num_q_blocks
        if CAUSAL:
            q_block = num_q_blocks - 1 - q_block
        head = (work // num_q_blocks) % num_heads
        b = work // (num_q_blocks * num_heads)
        q_row0, k_row0, len_q, len_k = _sequence_rows(b, head, CU_Q, CU_K, num_heads, group, rows_q, rows_k,
                                                      seqlen_q, seqlen_k, VARLEN)
        start_m = q_block * BLOCK_M
        if start_m < len_q:
            q_pos = start_m + rows
            q = desc_q.load([q_row0 + start_m, 0])
            out = Out + ((b * num_heads + head) * num_q_blocks + q_block).to(tl.int64) * num_k_blocks
            for r in range(num_regions):
                kb_lo = tl.load(REGIONS + r)
                k_hi = tl.minimum(tl.load(REGIONS + r + 1) * BLOCK_K, len_k)  # the region's keys end
                full_end = k_hi  # keys before it are allowed for every row of the tile
                if CAUSAL:
                    k_hi = tl.minimum(k_hi, start_m + BLOCK_M)
                    full_end = tl.minimum(full_end, start_m + 1)
                kb_hi = tl.cdiv(k_hi, BLOCK_K)
                kb_full = tl.maximum(tl.minimum(full_end // BLOCK_K, kb_hi), kb_lo)

                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                m_i = _row_max(m_i, q, q_pos, desc_k, k_row0, kb_lo, kb_full, k_hi, BLOCK_K, BLOCK_N, False, CAUSAL)
                m_i = _row_max(m_i, q, q_pos, desc_k, k_row0, kb_full, kb_hi, k_hi, BLOCK_K, BLOCK_N, True, CAUSAL)
                # A row with no allowed key in the region keeps m = -inf; shift it by 0 so that P = 0, not NaN.
                m_i = tl.where(m_i == float("-inf"), 0.0, m_i * qk_scale)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                l_i = _block_sums(l_i, q, q_pos, m_i, desc_k, k_row0, kb_lo, kb_full, k_hi, scratch, qk_scale,
                                  BLOCK_M, BLOCK_K, BLOCK_N, False, CAUSAL)
                l_i = _block_sums(l_i, q, q_pos, m_i, desc_k, k_row0, kb_full, kb_hi, k_hi, scratch, qk_scale,
                                  BLOCK_M, BLOCK_K, BLOCK_N, True, CAUSAL)

                # Rows past the sequence end and rows without keys weigh 0.
                inv_l = tl.where((q_pos < len_q) & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
                tl.debug_barrier()  # scratch written by other threads of this program
                for kb0 in range(kb_lo, kb_hi, CHUNK):
                    kbs = kb0 + tl.arange(0, CHUNK)
                    t = tl.load(scratch + kbs[:, None] * BLOCK_M + rows[None, :], mask=(kbs < kb_hi)[:, None],
                                other=0.0, cache_modifier=".cg")
                    tl.store(out + kbs, tl.sum(t * inv_l[None, :], 1), mask=kbs < kb_hi)
                tl.debug_barrier()  # read before the next region or item overwrites it


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

class Config(NamedTuple):
    """Keys per loop step (block_n divides block_k), warps, pipeline depth, and persistent programs
    per SM (each holds a BLOCK_M x Kb fp32 scratch)."""

    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int


# Not yet tuned on a GPU: the flash forward's H100 choice (benchmarks/block_mass.py times the candidates).
TUNED_CONFIGS = {64: Config(128, 4, 3, 2), 128: Config(128, 8, 3, 1)}
CANDIDATE_CONFIGS = {
    64: [Config(128, 4, 3, 2), Config(64, 4, 3, 2), Config(128, 8, 3, 1), Config(128, 8, 2, 2)],
    128: [Config(128, 8, 3, 1), Config(128, 8, 2, 1), Config(64, 8, 3, 1), Config(128, 8, 2, 2),
          Config(64, 4, 3, 2), Config(128, 4, 2, 2)],
}
# Under the Triton interpreter (CPU tests) each program costs time: few programs, whole key blocks.
INTERPRETER_CONFIG = Config(1 << 30, 4, 1, 2)

_AUTOTUNED: dict[tuple, Config] = {}


def _config(q: torch.Tensor, block_q: int, block_k: int, launch) -> Config:
    """The tuned config, or with SPARTA_ATTENTION_AUTOTUNE=1 the fastest candidate on the first call
    for this (head dim, dtype, block sizes, GPU), cached for the process."""
    table_key = 128 if q.shape[-1] > 64 else 64
    if q.device.type != "cuda":
        return INTERPRETER_CONFIG
    if os.environ.get("SPARTA_ATTENTION_AUTOTUNE") != "1":
        return TUNED_CONFIGS[table_key]
    key = (q.shape[-1], q.dtype, block_q, block_k, torch.cuda.get_device_name(q.device))
    if key not in _AUTOTUNED:
        times = {c: triton.testing.do_bench(lambda c=c: launch(c), return_mode="median")
                 for c in CANDIDATE_CONFIGS[table_key]}
        _AUTOTUNED[key] = min(times, key=times.get)
    return _AUTOTUNED[key]


def _descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A TMA descriptor over the [rows, head_dim] view of a contiguous [B, H, N, D] tensor."""
    view = x.view(-1, x.shape[-1])
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [block_rows, x.shape[-1]])


def _num_programs(device: torch.device, work: int, programs_per_sm: int) -> int:
    if device.type != "cuda":
        return min(work, programs_per_sm)
    return min(work, torch.cuda.get_device_properties(device).multi_processor_count * programs_per_sm)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def block_mass(q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_k: int = 128, *,
               sm_scale: float | None = None, causal: bool = False, region_starts: Sequence[int] = (0,),
               cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
               seqlen_q: int | None = None, seqlen_k: int | None = None, config: Config | None = None
               ) -> torch.Tensor:
    """Attention probability mass of each (query block, key block): fp32 [B, Hq, Qb, Kb].

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D] (Hq a multiple of Hkv), float16/bfloat16 on CUDA (float32
    too under TRITON_INTERPRET=1). Each row's softmax is taken within each region of key blocks
    starting at the key-block indices `region_starts` (so a row sums to the number of regions it
    reaches). Blocks that no query of the block attends (causal) are 0. For variable-length
    sequences pass packed [1, H, total, D] tensors, int32 cu_seqlens_q/k [B + 1] and the longest
    lengths seqlen_q/k (they size Qb and Kb; nothing waits for the GPU); blocks past a sequence's
    end are 0. `config` overrides the launch configuration (benchmarks).
    """
    varlen = _check_inputs(q, k, block_q, block_k, causal, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale: expected a positive float, got {sm_scale}")
    if not varlen:
        seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    num_q_blocks, num_k_blocks = -(-seqlen_q // block_q), -(-seqlen_k // block_k)
    starts = list(region_starts)
    if not starts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= num_k_blocks \
            or not all(isinstance(s, int) for s in starts):
        raise ValueError(f"region_starts: expected increasing int key-block indices starting at 0 and below "
                         f"{num_k_blocks}, got {starts}")
    regions = torch.tensor(starts + [num_k_blocks], dtype=torch.int32)
    if q.is_cuda:  # from page-locked memory: a copy from pageable memory waits for the GPU's queue
        regions = regions.pin_memory().to(q.device, non_blocking=True)
    q, k = q.contiguous(), k.contiguous()
    heads = q.shape[1]
    out = torch.zeros(batch, heads, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    cu_q = cu_seqlens_q if varlen else regions  # read only when VARLEN: any int32 pointer will do
    cu_k = cu_seqlens_k if varlen else regions
    work = batch * heads * num_q_blocks

    def launch(cfg: Config):
        block_n = min(cfg.block_n, block_k)
        programs = _num_programs(q.device, work, cfg.programs_per_sm)
        scratch = torch.empty(programs, num_k_blocks, block_q, dtype=torch.float32, device=q.device)
        _block_mass[(programs,)](
            _descriptor(q, block_q), _descriptor(k, block_n), out, scratch, regions, cu_q, cu_k, sm_scale * LOG2E,
            batch, heads, heads // k.shape[1], num_q_blocks, num_k_blocks, len(starts), q.shape[2], k.shape[2],
            seqlen_q, seqlen_k, BLOCK_M=block_q, BLOCK_K=block_k, BLOCK_N=block_n, HEAD_DIM=q.shape[-1],
            CHUNK=16, CAUSAL=causal, VARLEN=varlen, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if work:
        launch(config or _config(q, block_q, block_k, launch))
    return out


def block_mass_supports(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> bool:
    """Whether `block_mass` runs on these tensors and block sizes on the GPU (callers with a torch
    fallback, such as `sparta.attention.attention_block_mass`, ask first)."""
    return (q.is_cuda and k.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.dim() == 4 and q.shape[-1] in SUPPORTED_HEAD_DIMS and block_q in SUPPORTED_BLOCK_Q
            and _is_key_block(block_k))


def _is_key_block(block_k) -> bool:
    return isinstance(block_k, int) and 16 <= block_k <= 1024 and block_k & (block_k - 1) == 0


def _check_inputs(q, k, block_q, block_k, causal, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k) -> bool:
    """Validate; returns whether the inputs are packed variable-length sequences."""
    check_attention_tensors(q, {"k": k}, "block_mass_reference")
    head_dim = q.shape[-1]
    if k.shape[0] != q.shape[0] or k.shape[-1] != head_dim or q.shape[1] % k.shape[1]:
        raise ValueError(f"k: expected [{q.shape[0]}, Hkv, Nk, {head_dim}] with Hkv dividing {q.shape[1]}, "
                         f"got {tuple(k.shape)}")
    if block_q not in SUPPORTED_BLOCK_Q:
        raise ValueError(f"block_q: expected one of {SUPPORTED_BLOCK_Q}, got {block_q!r}")
    if not _is_key_block(block_k):
        raise ValueError(f"block_k: expected a power of two in [16, 1024], got {block_k!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q, cu_seqlens_k: give both or neither")
    if cu_seqlens_q is None:
        if seqlen_q is not None or seqlen_k is not None:
            raise ValueError("seqlen_q, seqlen_k: only for variable-length inputs (cu_seqlens); "
                             "otherwise the tensors' lengths count")
        return False
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 \
                or cu.device != q.device:
            raise ValueError(f"{name}: expected an int32 1-D tensor [B + 1] on {q.device}, got {_describe(cu)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_k: {cu_seqlens_k.numel() - 1} sequences, cu_seqlens_q has "
                         f"{cu_seqlens_q.numel() - 1}")
    for name, length, total in (("seqlen_q", seqlen_q, q.shape[2]), ("seqlen_k", seqlen_k, k.shape[2])):
        if not isinstance(length, int) or not 0 < length <= total:
            raise ValueError(f"{name}: expected the longest sequence's length, an int in [1, {total}], got {length!r}")
    if q.shape[0] != 1:
        raise ValueError(f"q: variable-length sequences come packed as [1, H, total, D], got {tuple(q.shape)}")
    return True
