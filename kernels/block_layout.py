"""The block layout: what the block-sparse attention kernels read instead of a dense mask.

A block mask says which (query block, key block) pairs attend. The kernels want, for each
(batch, head, query block), the list of its key blocks, with the blocks that need no element mask
("full") before the ones that do ("partial": the causal diagonal crosses them or they hold a
sequence end). The backward pass for dK/dV wants the transposed lists: for each key block, its query
blocks. `build_kernel_layout` makes both on the mask's device without host synchronisation (no
`.item()`, no host-sized `nonzero`): one Triton launch on the GPU, torch ops on the CPU.
Builds are cheap enough to run every step: on H100 the host cost is what counts (GPU work ~0.04 ms).

Conventions
- Causal is top-left aligned: query position i attends key position j <= i (as SDPA's `is_causal`
  and FlexAttention's `q_idx >= kv_idx`), positions counted from each sequence's start.
- Variable length (packed) batches: pass `cu_seqlens_q` / `cu_seqlens_k` (int32 [B + 1] on the
  mask's device, cumulative sequence starts as in FlashAttention) and give `seqlen_q` / `seqlen_k`
  as the LONGEST sequence; the mask covers ceil(longest / block) blocks and is read per sequence
  from its own start. Blocks past a sequence's end are dropped, the block holding it is partial.
  The layout then has one batch entry per sequence and the tensors are packed [1, H, total, D].
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

# Sort keys of a block in its list: full blocks first, then partial ones, then the absent ones.
_FULL, _PARTIAL, _ABSENT = 0, 1, 2


@dataclass(frozen=True)
class KernelLayout:
    """Per-block lists of a block-sparse attention pattern (see the module docstring).

    `kv_index[b, h, i, :kv_count[b, h, i]]` are the key blocks of query block i, the first
    `kv_full_count` of them full; the rest of each row holds the absent blocks and is never read.
    `q_count / q_full_count / q_index` are the same lists for each key block (transposed layout).
    `q_block_order` is the kernels' launch order of the flat (batch, head, query block) rows,
    longest lists first (see `longest_first`), int32.
    """

    kv_count: torch.Tensor  # int32 [B|1, H, Qb]
    kv_full_count: torch.Tensor  # int32 [B|1, H, Qb]
    kv_index: torch.Tensor  # int32 [B|1, H, Qb, Kb]
    q_count: torch.Tensor  # int32 [B|1, H, Kb]
    q_full_count: torch.Tensor  # int32 [B|1, H, Kb]
    q_index: torch.Tensor  # int32 [B|1, H, Kb, Qb]
    q_block_order: torch.Tensor  # int32 [B|1 * H * Qb]
    block_q: int
    block_k: int
    seqlen_q: int
    seqlen_k: int
    causal: bool
    cu_seqlens_q: torch.Tensor | None = None  # int32 [B + 1] for packed variable-length batches
    cu_seqlens_k: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.kv_count.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_count.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_count.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return self.q_count.shape[2]

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None


def build_kernel_layout(
    block_mask: torch.Tensor,
    block_q: int = 128,
    block_k: int = 128,
    *,
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> KernelLayout:
    """Compile a bool block mask [B|1, H, Qb, Kb] into the kernels' lists (no host synchronisation)."""
    _check_layout_args(block_mask, block_q, block_k, seqlen_q, seqlen_k, cu_seqlens_q, cu_seqlens_k)
    # On the GPU one Triton launch builds everything (the torch version is ~30 small launches).
    build = _build_triton if block_mask.is_cuda else _build_torch
    kv_lists, q_lists, q_block_order = build(block_mask, block_q, block_k, seqlen_q, seqlen_k, causal,
                                             cu_seqlens_q, cu_seqlens_k)
    kv_count, kv_full_count, kv_index = kv_lists
    q_count, q_full_count, q_index = q_lists
    return KernelLayout(
        kv_count=kv_count, kv_full_count=kv_full_count, kv_index=kv_index,
        q_count=q_count, q_full_count=q_full_count, q_index=q_index, q_block_order=q_block_order,
        block_q=block_q, block_k=block_k, seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
    )


def longest_first(work: torch.Tensor) -> torch.Tensor:
    """Launch order for programs with these amounts of work: longest first, so that short programs
    fill the SMs at the end. Lengths within a factor sqrt(2) count as equal and keep their (head,
    block) order, so programs running at the same time share K/V (or Q/dO) tiles in L2. Measured on
    H100 (D128, N16k, H16, density 0.1-0.25): an exact longest-first sort, which mixes all heads, was
    10-17% slower than the natural order; these classes stay within 2-6% of it.
    (Torch ops for CPU layouts; `launch_order` computes the same on the GPU.)"""
    length_class = torch.log2(work + 1.0).mul_(2.0).floor_()
    return torch.argsort(length_class, descending=True, stable=True).to(torch.int32)


def _build_torch(block_mask, block_q, block_k, seqlen_q, seqlen_k, causal, cu_seqlens_q, cu_seqlens_k):
    """Both lists with torch ops: classify every block, then a stable sort by category."""
    device = block_mask.device
    num_q_blocks, num_k_blocks = block_mask.shape[-2:]
    q_first = torch.arange(num_q_blocks, device=device)[:, None] * block_q  # first/last row of a block
    k_first = torch.arange(num_k_blocks, device=device)[None, :] * block_k
    q_last, k_last = q_first + block_q - 1, k_first + block_k - 1

    allowed = block_mask
    if cu_seqlens_q is not None:  # each sequence's own length: shape [B, 1, 1, 1]
        len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1])[:, None, None, None]
        len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[:, None, None, None]
        allowed = allowed & (q_first < len_q) & (k_first < len_k)
    else:
        len_q, len_k = seqlen_q, seqlen_k
    partial = (q_last >= len_q) | (k_last >= len_k)
    if causal:
        allowed = allowed & (q_last >= k_first)  # some pair in the block has i >= j
        partial = partial | (q_first < k_last)  # some pair has i < j
    category = torch.where(allowed, partial.to(torch.uint8), _ABSENT)
    kv_lists = _sorted_lists(category)
    return kv_lists, _sorted_lists(category.transpose(-1, -2).contiguous()), longest_first(kv_lists[0].flatten())


def _sorted_lists(category: torch.Tensor):
    """Count, full count and ordered indices (full, partial, absent) along the last dim."""
    count = (category != _ABSENT).sum(-1, dtype=torch.int32)
    full_count = (category == _FULL).sum(-1, dtype=torch.int32)
    index = torch.sort(category, dim=-1, stable=True).indices.to(torch.int32)
    return count, full_count, index


@triton.jit
def _length_class(work):
    """Lengths within a factor sqrt(2) share a class: floor(2 log2(work + 1)), as in longest_first."""
    return tl.floor(2.0 * tl.log2(work.to(tl.float32) + 1.0)).to(tl.int32)


@triton.jit
def _class_one_hot(WORK, items, num_items, group, num_blocks, classes):
    """[items, classes] 0/1: the length class of each item. Item i = (row r, block j), i = r *
    num_blocks + j, weighs sum over g < group of WORK[(r * group + g) * num_blocks + j]."""
    valid = items < num_items
    first = (items // num_blocks) * group * num_blocks + items % num_blocks
    work = tl.zeros_like(items)
    for g in range(group):
        work += tl.load(WORK + first + g * num_blocks, mask=valid, other=0, cache_modifier=".cg")
    return ((_length_class(work)[:, None] == classes[None, :]) & valid[:, None]).to(tl.int32)


@triton.jit
def _longest_first_order(WORK, ORDER, num_items, group, num_blocks, NUM_CLASSES: tl.constexpr,
                         CHUNK: tl.constexpr):
    """ORDER = the items by decreasing length class, in item order within a class (a stable
    counting sort in one program: a histogram pass, then a pass that places each item)."""
    classes = tl.arange(0, NUM_CLASSES)
    histogram = tl.zeros([NUM_CLASSES], tl.int32)
    for start in range(0, num_items, CHUNK):
        histogram += tl.sum(_class_one_hot(WORK, start + tl.arange(0, CHUNK), num_items, group, num_blocks,
                                           classes), 0)
    next_position = num_items - tl.cumsum(histogram, 0)  # the items of higher classes come first
    for start in range(0, num_items, CHUNK):
        items = start + tl.arange(0, CHUNK)
        in_class = _class_one_hot(WORK, items, num_items, group, num_blocks, classes)
        rank = tl.cumsum(in_class, 0) - in_class  # earlier items of the same class in this chunk
        position = tl.sum(in_class * (next_position[None, :] + rank), 1)
        tl.store(ORDER + position, items, mask=items < num_items)
        next_position += tl.sum(in_class, 0)


@triton.jit
def _launch_order_kernel(WORK, ORDER, num_items, group, num_blocks, NUM_CLASSES: tl.constexpr,
                         CHUNK: tl.constexpr):
    _longest_first_order(WORK, ORDER, num_items, group, num_blocks, NUM_CLASSES, CHUNK)


def launch_order(work: torch.Tensor, max_count: int, group: int = 1) -> torch.Tensor:
    """`longest_first` on the GPU in one launch (int32), with the work of `group` consecutive rows
    summed: work [B, H * group, blocks] -> order over [B, H, blocks] (dK/dV programs under GQA).
    max_count bounds every entry of work (for the transposed lists: the number of query blocks); it
    sizes the class table, and an entry above it would lose its item."""
    num_items = work.numel() // group
    order = torch.empty(num_items, dtype=torch.int32, device=work.device)
    _launch_order_kernel[(1,)](work, order, num_items, group, work.shape[-1],
                               NUM_CLASSES=_num_length_classes(max_count * group), CHUNK=256, num_warps=4)
    return order


def _num_length_classes(max_work: int) -> int:
    return triton.next_power_of_2(int(2 * math.log2(max_work + 1)) + 1)


@triton.jit
def _element_mask(q_pos, k_pos, len_q, len_k, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a partial block attend: inside both sequences, and causal (the
    conventions above). Shared by the attention kernels, Triton and Gluon."""
    keep = (q_pos[:, None] < len_q) & (k_pos[None, :] < len_k)
    if CAUSAL:
        keep = keep & (q_pos[:, None] >= k_pos[None, :])
    return keep


@triton.jit
def _tile_coordinates(tile, batch_offset, ORDER, CU_Q, CU_K, num_heads, num_blocks, group, rows_q, rows_k,
                      seqlen_q, seqlen_k, SPLIT: tl.constexpr, VARLEN: tl.constexpr):
    """Map an attention kernel's work tile to its layout row and the first rows of its sequence in
    the [rows, D] views of the tensors.

    Tiles take layout rows in ORDER, SPLIT tiles per row; batch_offset is added to the layout row's
    batch (a layout shared by the batch: the Triton kernels' grid axis 1). Returns (layout row,
    batch, head, block, sub-tile, first q row, first k row, len_q, len_k). Also called from the
    Gluon forward."""
    row = tl.load(ORDER + tile // SPLIT)
    sub = tile % SPLIT
    block = row % num_blocks
    head = (row // num_blocks) % num_heads
    batch = row // (num_blocks * num_heads) + batch_offset
    q_row0, k_row0, len_q, len_k = _sequence_rows(batch, head, CU_Q, CU_K, num_heads, group, rows_q, rows_k,
                                                  seqlen_q, seqlen_k, VARLEN)
    return row, batch, head, block, sub, q_row0, k_row0, len_q, len_k


@triton.jit
def _sequence_rows(batch, head, CU_Q, CU_K, num_heads, group, rows_q, rows_k, seqlen_q, seqlen_k,
                   VARLEN: tl.constexpr):
    """The first q and k rows of (batch, head)'s sequence in the [rows, D] views of the tensors, and
    its lengths: GQA (k head = head // group), packed variable-length sequences or a padded batch."""
    if VARLEN:  # packed [1, H, total, D]: the sequence starts at cu_seqlens[batch]
        q_start = tl.load(CU_Q + batch)
        k_start = tl.load(CU_K + batch)
        len_q = tl.load(CU_Q + batch + 1) - q_start
        len_k = tl.load(CU_K + batch + 1) - k_start
        q_row0 = head * rows_q + q_start
        k_row0 = (head // group) * rows_k + k_start
    else:
        len_q = seqlen_q
        len_k = seqlen_k
        q_row0 = (batch * num_heads + head) * rows_q
        k_row0 = (batch * (num_heads // group) + head // group) * rows_k
    return q_row0, k_row0, len_q, len_k


@triton.jit
def _block_lists_kernel(MASK, stride_b, stride_h, stride_q, stride_k, CU_Q, CU_K, DONE,
                        KV_COUNT, KV_FULL, KV_INDEX, Q_COUNT, Q_FULL, Q_INDEX, ORDER,
                        num_kv_lists, heads, num_q_blocks, num_k_blocks, seqlen_q, seqlen_k, block_q, block_k,
                        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, WIDTH: tl.constexpr,
                        NUM_CLASSES: tl.constexpr, CHUNK: tl.constexpr):
    """One program per list. Programs below num_kv_lists list the key blocks of one query block; the
    others list the query blocks of one key block (transposed layout). Same classification as
    _build_torch; the order (full, partial, absent) comes from running counts. The program
    that finishes last writes the launch order of the key lists (so the whole layout is one launch)."""
    pid = tl.program_id(0)
    is_kv_list = pid < num_kv_lists
    list_id = tl.where(is_kv_list, pid, pid - num_kv_lists)
    own_blocks = tl.where(is_kv_list, num_q_blocks, num_k_blocks)
    other_blocks = tl.where(is_kv_list, num_k_blocks, num_q_blocks)
    block = list_id % own_blocks
    head = (list_id // own_blocks) % heads
    batch = list_id // (own_blocks * heads)
    others = tl.arange(0, WIDTH)
    in_range = others < other_blocks
    q_block = tl.where(is_kv_list, block, others)
    k_block = tl.where(is_kv_list, others, block)
    if VARLEN:
        len_q = tl.load(CU_Q + batch + 1) - tl.load(CU_Q + batch)
        len_k = tl.load(CU_K + batch + 1) - tl.load(CU_K + batch)
    else:
        len_q = seqlen_q
        len_k = seqlen_k
    listed = tl.load(MASK + batch * stride_b + head * stride_h + q_block * stride_q + k_block * stride_k,
                     mask=in_range, other=0) != 0
    q_first, k_first = q_block * block_q, k_block * block_k
    q_last, k_last = q_first + block_q - 1, k_first + block_k - 1
    allowed = listed & (q_first < len_q) & (k_first < len_k)
    partial = (q_last >= len_q) | (k_last >= len_k)
    if CAUSAL:
        allowed = allowed & (q_last >= k_first)
        partial = partial | (q_first < k_last)
    is_full = (allowed & (partial == 0)).to(tl.int32)
    is_partial = (allowed & partial).to(tl.int32)
    is_absent = (in_range & (allowed == 0)).to(tl.int32)
    num_full = tl.sum(is_full)
    num_listed = num_full + tl.sum(is_partial)
    rank = tl.where(is_full != 0, tl.cumsum(is_full) - 1,
                    tl.where(is_partial != 0, num_full + tl.cumsum(is_partial) - 1,
                             num_listed + tl.cumsum(is_absent) - 1))
    if is_kv_list:
        tl.store(KV_COUNT + list_id, num_listed)
        tl.store(KV_FULL + list_id, num_full)
        tl.store(KV_INDEX + list_id * other_blocks + rank, others, mask=in_range)
    else:
        tl.store(Q_COUNT + list_id, num_listed)
        tl.store(Q_FULL + list_id, num_full)
        tl.store(Q_INDEX + list_id * other_blocks + rank, others, mask=in_range)
    # Release this program's counts, then count it done; the last one sees every count (acquire).
    tl.debug_barrier()
    if tl.atomic_add(DONE, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        _longest_first_order(KV_COUNT, ORDER, num_kv_lists, 1, 1, NUM_CLASSES, CHUNK)


def _build_triton(block_mask, block_q, block_k, seqlen_q, seqlen_k, causal, cu_seqlens_q, cu_seqlens_k):
    """Both lists and the launch order in one launch, into one zeroed buffer (a few host calls)."""
    mask_batch, heads, num_q_blocks, num_k_blocks = block_mask.shape
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else mask_batch
    num_kv_lists, num_q_lists = batch * heads * num_q_blocks, batch * heads * num_k_blocks
    sizes = (1, num_kv_lists, num_kv_lists, num_kv_lists * num_k_blocks, num_q_lists, num_q_lists,
             num_q_lists * num_q_blocks, num_kv_lists)
    buffer = torch.zeros(sum(sizes), dtype=torch.int32, device=block_mask.device)
    done, kv_count, kv_full, kv_index, q_count, q_full, q_index, order = buffer.split(sizes)
    mask = block_mask.view(torch.uint8)
    cu_q = cu_seqlens_q if varlen else done  # any int32 pointer when unused
    cu_k = cu_seqlens_k if varlen else done
    _block_lists_kernel[(num_kv_lists + num_q_lists,)](
        mask, mask.stride(0) if mask_batch > 1 else 0,  # a batch-1 mask serves every sequence
        mask.stride(1), mask.stride(2), mask.stride(3), cu_q, cu_k, done,
        kv_count, kv_full, kv_index, q_count, q_full, q_index, order,
        num_kv_lists, heads, num_q_blocks, num_k_blocks, seqlen_q, seqlen_k, block_q, block_k,
        CAUSAL=causal, VARLEN=varlen, WIDTH=triton.next_power_of_2(max(num_q_blocks, num_k_blocks)),
        NUM_CLASSES=_num_length_classes(num_k_blocks), CHUNK=256)
    kv_shape, q_shape = (batch, heads, num_q_blocks), (batch, heads, num_k_blocks)
    return ((kv_count.view(kv_shape), kv_full.view(kv_shape), kv_index.view(*kv_shape, num_k_blocks)),
            (q_count.view(q_shape), q_full.view(q_shape), q_index.view(*q_shape, num_q_blocks)), order)


def _check_layout_args(block_mask, block_q, block_k, seqlen_q, seqlen_k, cu_seqlens_q, cu_seqlens_k):
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(f"block_mask: expected a bool tensor [B|1, H, Qb, Kb], got {_describe(block_mask)}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name}: expected one of {SUPPORTED_BLOCK_SIZES}, got {block}")
    for name, seqlen, block, blocks in (("seqlen_q", seqlen_q, block_q, block_mask.shape[2]),
                                        ("seqlen_k", seqlen_k, block_k, block_mask.shape[3])):
        if not isinstance(seqlen, int) or seqlen < 1:
            raise ValueError(f"{name}: expected a positive int, got {seqlen!r}")
        if -(-seqlen // block) != blocks:
            raise ValueError(f"{name}={seqlen} with blocks of {block} needs {-(-seqlen // block)} blocks, "
                             f"block_mask has {blocks} (shape {tuple(block_mask.shape)})")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k: give both (packed variable-length batch) or neither")
    if cu_seqlens_q is None:
        return
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name}: expected an int32 tensor [B + 1], got {_describe(cu)}")
        if cu.device != block_mask.device:
            raise ValueError(f"{name}: on {cu.device}, block_mask on {block_mask.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_k: {cu_seqlens_k.numel() - 1} sequences, cu_seqlens_q has "
                         f"{cu_seqlens_q.numel() - 1}")
    if block_mask.shape[0] not in (1, cu_seqlens_q.numel() - 1):
        raise ValueError(f"block_mask: batch {block_mask.shape[0]}, expected 1 or the number of "
                         f"sequences {cu_seqlens_q.numel() - 1}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
