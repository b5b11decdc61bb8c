"""Block-sparse attention forward for Hopper (sm_90) at head dim 128, in Gluon.

The same contract as `_attn_fwd` in block_sparse_attention.py (same layout, launch order, outputs,
bit for bit), written with explicit wgmma waits. Per key tile j the loop is

    issue S_j = Q K_j^T, wait for it
    issue acc += P_{j-1} V_{j-1}         (asynchronous)
    online softmax of S_j -> P_j         (CUDA cores, while the tensor cores run P_{j-1} V_{j-1})
    wait for acc, rescale it

Triton's pipeliner cannot express this: it waits for every wgmma whose result the loop body reads
before the next op, so there the softmax and the P V product never overlap.

The kernel is persistent: one program per SM takes one query tile per round, in launch order
(longest lists first), rounds alternating direction over the programs so that no program gets the
longest tile of every round. K and V tiles arrive by TMA into a two-stage ring that runs across
query tiles, and the next query tile's Q is loaded into a second buffer: while a program finishes
one query tile it already loads the next one's first key tiles, so a short (sparse) list does not
wait for its start. A ring stage is refilled once every warp has finished with it.

Measured on H100 (bf16, B1 H16 N16k, benchmarks/attention.py masks), against the Triton forward:
1.09-1.12x dense, 1.01-1.12x at densities 0.1-0.5, except random masks at 0.5, which vary from 0.89x
to 1.07x between runs: there the busiest SM works 7% longer than the average under this static
schedule, 3% under the Triton grid's (ncu). At head dim 64 the same design reaches only 0.57-0.94x
(64- or 128-row tiles, 1 or 2 programs per SM), so there the Triton kernel runs.
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .block_layout import _element_mask, _tile_coordinates

# Names that changed after Triton 3.6: take whichever this version has.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
STAGES = gl.constexpr(2)  # K/V ring depth


@functools.cache
def _sm_count(device: torch.device) -> int | None:
    """SMs of an sm_90 GPU, None for any other."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count if (props.major, props.minor) == (9, 0) else None


def applies(q: torch.Tensor, block_q: int, block_k: int) -> bool:
    """Whether this kernel runs the forward: an sm_90 GPU, fp16/bf16, head dim 128, blocks of 64 or 128."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == 128
            and _sm_count(q.device) is not None
            and block_q in (64, 128) and block_k in (64, 128))


@gluon.jit
def _item_coordinates(item, ORDER, CU_Q, CU_K, batch_repeat, num_heads, num_q_blocks, group, rows_q, rows_k,
                      seqlen_q, seqlen_k, BLOCK_Q: gl.constexpr, BLOCK_M: gl.constexpr, VARLEN: gl.constexpr):
    """Work item -> (layout row, first row of its sequence's queries, the query tile's first
    position, first row of its keys, len_q, len_k). Items run over the Triton forward's grid:
    (launch order x split of the query block) x batch repeat."""
    row, _, _, q_block, sub, q_row0, k_row0, len_q, len_k = _tile_coordinates(
        item // batch_repeat, item % batch_repeat, ORDER, CU_Q, CU_K, num_heads, num_q_blocks, group, rows_q, rows_k,
        seqlen_q, seqlen_k, BLOCK_Q // BLOCK_M, VARLEN)
    return row, q_row0, q_block * BLOCK_Q + sub * BLOCK_M, k_row0, len_q, len_k


@gluon.jit
def _item_of_round(round, num_items):
    """This program's work item in a round, num_items (no item) if none. Rounds alternate direction
    over the programs (0..P-1, then P-1..0): with items sorted longest first, a plain round robin
    would give program 0 the longest item of every round."""
    first = gl.program_id(0)
    num_programs = gl.num_programs(0)
    slot = gl.where(round % 2 == 0, first, num_programs - 1 - first)
    return gl.minimum(round * num_programs + slot, num_items)


@gluon.jit
def _load_tile(desc, smem, bars, stage, row):
    mbarrier.expect(bars.index(stage), desc.block_type.nbytes)
    _tma_load(desc, [row, 0], bars.index(stage), smem.index(stage))


@gluon.jit
def _next_key_tile(cursor, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks, BLOCK_N: gl.constexpr):
    """Advance the loader's cursor over this program's stream of key tiles (every key tile of its
    query tiles, in order) and return it with the row of the tile it now points at (-1 past the end).
    The index is loaded here, one loop step before the row is used."""
    round, j, count, row, k_row0 = cursor
    num_rounds = gl.cdiv(num_items, gl.num_programs(0))
    j += 1
    while (j >= count) & (round < num_rounds):  # on to the next query tile with key tiles
        round += 1
        j -= count  # here j == count: both become 0 (and stay int32 tensors, as loop variables must)
        count -= count
        item = _item_of_round(round, num_items)
        if item < num_items:
            row, _, _, k_row0, _, _ = _item_coordinates(item, *coords)
            count = gl.load(KV_COUNT + row)
    tile_row = -1
    if round < num_rounds:
        tile_row = k_row0 + gl.load(KV_INDEX + row.to(gl.int64) * num_k_blocks + j) * BLOCK_N
    return (round, j, count, row, k_row0), tile_row


@gluon.jit
def _softmax_tile(s, m_i, l_i, q_pos, k_pos, len_q, len_k, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Online-softmax step over tile scores s: P (unnormalised), the rescale of the old rows, m, l."""
    if MASKED:
        s = gl.where(_element_mask(q_pos, k_pos, len_q, len_k, CAUSAL), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        # A row with nothing allowed so far keeps m = -inf; shift it by 0 so that P = 0, not NaN.
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_shift[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_shift = m_new
        p = gl.exp2(s * qk_scale - m_shift[:, None])
    alpha = gl.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _attend_tiles(lo, hi, t0, state, args, MASKED: gl.constexpr, CAUSAL: gl.constexpr, o_layout: gl.constexpr,
                  p_layout: gl.constexpr):
    """Key tiles lo..hi of the list (ring positions t0 + j): S_j, then P_{j-1} V_{j-1} overlapped with
    the softmax of S_j; each step refills the ring with the stream's next tiles."""
    acc, m_i, l_i, p, cursor, k_refill_row, v_refill_row = state
    q_tile, k_smem, v_smem, k_bars, v_bars, desc_k, desc_v, k_blocks, q_pos, k_offsets, len_q, len_k, \
        qk_scale, s_zero, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks = args
    BLOCK_N: gl.constexpr = desc_k.block_type.shape[0]
    dtype: gl.constexpr = desc_k.dtype
    for j in range(lo, hi):
        t = t0 + j
        k_stage = t % STAGES
        mbarrier.wait(k_bars.index(k_stage), (t // STAGES) & 1)
        s = warpgroup_mma(q_tile, k_smem.index(k_stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        v_stage = (t - 1) % STAGES
        mbarrier.wait(v_bars.index(v_stage), ((t - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(v_stage), acc, is_async=True)
        k_pos = k_offsets
        if MASKED:
            k_pos = gl.load(k_blocks + j) * BLOCK_N + k_offsets
        p_next, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, q_pos, k_pos, len_q, len_k, qk_scale, MASKED, CAUSAL)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = gl.convert_layout(p_next.to(dtype), p_layout)
        _barrier()  # every warp is done with the K stage of tile t and the V stage of tile t - 1
        if k_refill_row >= 0:
            _load_tile(desc_k, k_smem, k_bars, k_stage, k_refill_row)
        if v_refill_row >= 0:
            _load_tile(desc_v, v_smem, v_bars, v_stage, v_refill_row)
        v_refill_row = k_refill_row
        cursor, k_refill_row = _next_key_tile(cursor, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks, BLOCK_N)
    return acc, m_i, l_i, p, cursor, k_refill_row, v_refill_row


@gluon.jit
def _attn_fwd_hopper(desc_q, desc_k, desc_v, Out, LSE, KV_COUNT, KV_FULL, KV_INDEX, ORDER, CU_Q, CU_K,
                     qk_scale, num_items, batch_repeat, num_heads, num_q_blocks, num_k_blocks, group, rows_q, rows_k,
                     seqlen_q, seqlen_k, BLOCK_Q: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
                     num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = desc_q.block_type.shape[0]
    HEAD_DIM: gl.constexpr = desc_q.block_type.shape[1]
    BLOCK_N: gl.constexpr = desc_k.block_type.shape[0]
    dtype: gl.constexpr = desc_q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    THREADS_PER_ROW: gl.constexpr = HEAD_DIM // 8  # O is stored as 16-byte vectors
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // THREADS_PER_ROW, THREADS_PER_ROW], [num_warps, 1], [1, 0])

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(2):
        mbarrier.init(q_bars.index(stage), count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(stage), count=1)
        mbarrier.init(v_bars.index(stage), count=1)

    coords = (ORDER, CU_Q, CU_K, batch_repeat, num_heads, num_q_blocks, group, rows_q, rows_k, seqlen_q, seqlen_k,
              BLOCK_Q, BLOCK_M, VARLEN)
    first = gl.program_id(0)
    num_programs = gl.num_programs(0)
    k_offsets = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    # The first query tile's Q; then the loader's cursor starts one tile before this program's first
    # key tile and fills the ring.
    row, q_row0, start_m, k_row0, _, _ = _item_coordinates(first, *coords)
    mbarrier.expect(q_bars.index(0), desc_q.block_type.nbytes)
    _tma_load(desc_q, [q_row0 + start_m, 0], q_bars.index(0), q_smem.index(0))
    zero = first * 0  # an int32 tensor: the cursor's fields are loop variables
    cursor = (zero, zero - 1, gl.load(KV_COUNT + row), row, k_row0)
    cursor, k_refill_row = _next_key_tile(cursor, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks, BLOCK_N)
    for stage in gl.static_range(STAGES):
        if k_refill_row >= 0:
            _load_tile(desc_k, k_smem, k_bars, stage, k_refill_row)
            _load_tile(desc_v, v_smem, v_bars, stage, k_refill_row)
        cursor, k_refill_row = _next_key_tile(cursor, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks, BLOCK_N)

    t = 0  # ring position of the next key tile
    n = 0  # query tiles done by this program
    v_refill_row = -1
    for round in range(0, gl.cdiv(num_items, num_programs)):
        item = _item_of_round(round, num_items)
        if item < num_items:
            _barrier()  # every warp is done with the previous query tile: its Q buffer is free
            next_item = _item_of_round(round + 1, num_items)
            if next_item < num_items:  # this program's next Q tile, into the other buffer
                _, next_q_row0, next_start_m, _, _, _ = _item_coordinates(next_item, *coords)
                mbarrier.expect(q_bars.index((n + 1) % 2), desc_q.block_type.nbytes)
                _tma_load(desc_q, [next_q_row0 + next_start_m, 0], q_bars.index((n + 1) % 2), q_smem.index((n + 1) % 2))
            row, q_row0, start_m, k_row0, len_q, len_k = _item_coordinates(item, *coords)
            q_tile = q_smem.index(n % 2)
            mbarrier.wait(q_bars.index(n % 2), (n // 2) & 1)  # also when unused: one load in flight per buffer
            count = gl.load(KV_COUNT + row)
            full = gl.load(KV_FULL + row)
            k_blocks = KV_INDEX + row.to(gl.int64) * num_k_blocks
            q_pos = start_m + gl.arange(0, BLOCK_M, layout=rows_layout)
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_layout)
            l_i = gl.zeros([BLOCK_M], gl.float32, rows_layout)
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
            if count > 0:
                k_stage = t % STAGES
                mbarrier.wait(k_bars.index(k_stage), (t // STAGES) & 1)
                s = warpgroup_mma(q_tile, k_smem.index(k_stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s,))
                start_n = gl.load(k_blocks) * BLOCK_N
                if full > 0:
                    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, q_pos, start_n + k_offsets, len_q, len_k, qk_scale,
                                                       False, CAUSAL)
                else:
                    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, q_pos, start_n + k_offsets, len_q, len_k, qk_scale,
                                                       True, CAUSAL)
                p = gl.convert_layout(p.to(dtype), p_layout)
                _barrier()  # every warp is done with the K stage of tile t
                if k_refill_row >= 0:
                    _load_tile(desc_k, k_smem, k_bars, k_stage, k_refill_row)
                v_refill_row = k_refill_row
                cursor, k_refill_row = _next_key_tile(cursor, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks,
                                                      BLOCK_N)

                state = (acc, m_i, l_i, p, cursor, k_refill_row, v_refill_row)
                args = (q_tile, k_smem, v_smem, k_bars, v_bars, desc_k, desc_v, k_blocks, q_pos, k_offsets, len_q, len_k,
                        qk_scale, s_zero, coords, KV_COUNT, KV_INDEX, num_items, num_k_blocks)
                state = _attend_tiles(1, gl.maximum(full, 1), t, state, args, False, CAUSAL, o_layout, p_layout)
                state = _attend_tiles(gl.maximum(full, 1), count, t, state, args, True, CAUSAL, o_layout, p_layout)
                acc, m_i, l_i, p, cursor, k_refill_row, v_refill_row = state
                t += count
                v_stage = (t - 1) % STAGES
                mbarrier.wait(v_bars.index(v_stage), ((t - 1) // STAGES) & 1)
                acc = warpgroup_mma(p, v_smem.index(v_stage), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                _barrier()  # every warp is done with the V stage of the last tile
                if v_refill_row >= 0:
                    _load_tile(desc_v, v_smem, v_bars, v_stage, v_refill_row)
                v_refill_row = -1

            alive = l_i > 0.0
            l_safe = gl.where(alive, l_i, 1.0)
            lse = gl.where(alive, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            gl.store(LSE + (q_row0 + q_pos).to(gl.int64), lse, mask=q_pos < len_q)
            o = (acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]).to(dtype)
            o = gl.convert_layout(o, out_layout)
            out_pos = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
            dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
            out_rows = (q_row0 + out_pos).to(gl.int64)
            gl.store(Out + out_rows[:, None] * HEAD_DIM + dims[None, :], o, mask=(out_pos < len_q)[:, None])
            n += 1

    for stage in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(stage))
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(stage))
        mbarrier.invalidate(v_bars.index(stage))


def _descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    view = x.view(-1, x.shape[-1])
    element = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, x.shape[-1]], element)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [block_rows, x.shape[-1]], layout)


def forward(q, k, v, o, lse, layout_tensors, cu_q, cu_k, scalars, batch_repeat, block_q, block_k, causal, varlen,
            qk_scale):
    """Launch one persistent program per SM over the work items of the Triton forward's grid."""
    kv_count, kv_full_count, kv_index, q_block_order = layout_tensors
    block_m = min(block_q, 128)
    num_items = q_block_order.numel() * (block_q // block_m) * batch_repeat
    num_programs = max(1, min(num_items, _sm_count(q.device)))
    _attn_fwd_hopper[(num_programs,)](_descriptor(q, block_m), _descriptor(k, block_k), _descriptor(v, block_k), o, lse,
                                      kv_count, kv_full_count, kv_index, q_block_order, cu_q, cu_k, qk_scale,
                                      num_items, batch_repeat, *scalars,
                                      BLOCK_Q=block_q, CAUSAL=causal, VARLEN=varlen, num_warps=block_m // 16)
