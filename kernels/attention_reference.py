"""Pure-torch block-sparse attention: the same math as the Triton kernels, from the same layout.

It materialises the dense element mask (listed blocks, causal, sequence ends) and runs a plain
masked softmax in float32, so it is slow and memory-hungry: it exists for tests and checks.
"""

import torch

from .block_layout import KernelLayout


def layout_block_mask(layout: KernelLayout) -> torch.Tensor:
    """The listed blocks as a bool mask [B|1, H, Qb, Kb], read back from kv_count / kv_index."""
    num_k_blocks = layout.num_k_blocks
    listed = torch.arange(layout.kv_index.shape[-1], device=layout.kv_index.device) < layout.kv_count[..., None]
    # Unlisted entries go to a spare column that is dropped afterwards.
    index = torch.where(listed, layout.kv_index.long(), num_k_blocks)
    mask = torch.zeros(*layout.kv_count.shape, num_k_blocks + 1, dtype=torch.bool, device=index.device)
    return mask.scatter_(-1, index, True)[..., :num_k_blocks]


def layout_element_mask(layout: KernelLayout) -> torch.Tensor:
    """The bool mask of attending (query, key) pairs: [B|1, H, Nq, Nk], or [1, H, total_q, total_k]
    over the packed tensors of a variable-length layout (sequences on the block diagonal)."""
    blocks = layout_block_mask(layout)
    if not layout.is_varlen:
        return _sequence_mask(blocks, layout, layout.seqlen_q, layout.seqlen_k)
    starts_q, starts_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    mask = torch.zeros(1, layout.heads, starts_q[-1], starts_k[-1], dtype=torch.bool, device=blocks.device)
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        mask[0, :, q0:q1, k0:k1] = _sequence_mask(blocks[b], layout, q1 - q0, k1 - k0)
    return mask


def _sequence_mask(blocks, layout: KernelLayout, len_q: int, len_k: int) -> torch.Tensor:
    elements = blocks.repeat_interleave(layout.block_q, -2).repeat_interleave(layout.block_k, -1)
    elements = elements[..., :len_q, :len_k]
    if layout.causal:
        q_pos = torch.arange(len_q, device=blocks.device)[:, None]
        k_pos = torch.arange(len_k, device=blocks.device)[None, :]
        elements = elements & (q_pos >= k_pos)
    return elements


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KernelLayout,
                                     sm_scale: float | None = None, return_lse: bool = False):
    """Same contract as `block_sparse_attention`, computed in float32 with a dense mask."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    mask = layout_element_mask(layout)
    scores = torch.where(mask, (q.float() @ k.transpose(-1, -2)) * sm_scale, float("-inf"))
    alive = mask.any(-1)
    # A row with no allowed key: softmax is NaN there; it is replaced (not multiplied) by 0, so no
    # NaN reaches the gradients either.
    p = torch.where(alive[..., None], torch.softmax(scores, dim=-1), 0.0)
    o = (p @ v).to(q.dtype)
    if not return_lse:
        return o
    lse = torch.where(alive, torch.logsumexp(scores, dim=-1), float("-inf"))
    return o, lse


def block_mass_reference(q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_k: int = 128, *,
                         sm_scale: float | None = None, causal: bool = False, region_starts=(0,),
                         cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                         seqlen_q: int | None = None, seqlen_k: int | None = None) -> torch.Tensor:
    """Same contract as `block_mass`, computed in float32 from the whole probability matrix."""
    if cu_seqlens_q is not None:  # one sequence at a time, into the blocks of the longest
        out = q.new_zeros(cu_seqlens_q.numel() - 1, q.shape[1], -(-seqlen_q // block_q), -(-seqlen_k // block_k),
                          dtype=torch.float32)
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(out.shape[0]):
            part = block_mass_reference(q[:, :, starts_q[b]:starts_q[b + 1]], k[:, :, starts_k[b]:starts_k[b + 1]],
                                        block_q, block_k, sm_scale=sm_scale, causal=causal,
                                        region_starts=region_starts)
            out[b, :, :part.shape[2], :part.shape[3]] = part[0]
        return out
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.float() @ k.transpose(-1, -2) * sm_scale
    len_q, len_k = scores.shape[-2:]
    if causal:
        scores = scores.masked_fill(torch.ones(len_q, len_k, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    edges = [s * block_k for s in region_starts if s * block_k < len_k] + [len_k]
    # A row with no allowed key in a region (causal) gets NaN from softmax there: it counts 0.
    probs = torch.cat([scores[..., lo:hi].softmax(-1).nan_to_num(0.0) for lo, hi in zip(edges, edges[1:])], dim=-1)
    blocks_q, blocks_k = -(-len_q // block_q), -(-len_k // block_k)
    probs = torch.nn.functional.pad(probs, (0, blocks_k * block_k - len_k, 0, blocks_q * block_q - len_q))
    return probs.unflatten(-1, (blocks_k, block_k)).unflatten(-3, (blocks_q, block_q)).sum(dim=(-3, -1))
