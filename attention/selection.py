"""Dynamic block selection: the key blocks each query block needs, chosen from the data on the GPU.

Everything here is fixed-shape torch ops (top-k with a Python k, sort + cumsum, scatter), so a
selection never waits for the GPU: no `.item()`, no `nonzero()`. Two scorers:

- `pooled_block_logits`: mean-pooled q and k per block, one small matmul. Cheap enough for every
  step (the coarse stage of trainable sparse attention, VSA-style; `DynamicBlockSelection`).
- `attention_block_mass`: the exact mean attention probability of each block pair. On the GPU the
  fused Triton kernel `sparta.kernels.block_mass` (two passes over the keys, no N x N tensor; about
  a dense attention forward); elsewhere torch in query chunks. Meant for rare decisions (SparseD's
  switch step, the pattern search).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparta.attention.layout import BlockLayout, HeadGroup
from sparta.kernels import block_mass, block_mass_supports


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block's tokens: [B, H, N, D] -> fp32 [B, H, ceil(N / block), D] (the last block
    averages only the tokens it has)."""
    length = x.shape[-2]
    blocks = -(-length // block)
    padded = F.pad(x.float(), (0, 0, 0, blocks * block - length))
    sums = padded.unflatten(-2, (blocks, block)).sum(-2)
    return sums / _block_sizes(length, block, x.device)[:, None]


def pooled_block_logits(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int,
                        sm_scale: float | None = None) -> torch.Tensor:
    """Block-level attention logits fp32 [B, Hq, Qb, Kb] from pooled q and k.

    A key block's logit gets + log(its token count): its share of a query's attention grows with the
    number of keys it holds, which matters only for a short last block.
    """
    _check_qk(q, k)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    pooled_k = pool_blocks(k, block_k).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = pool_blocks(q, block_q) @ pooled_k.transpose(-1, -2) * scale
    return logits + _block_sizes(k.shape[-2], block_k, k.device).log()


def topk_blocks(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """bool mask with the `topk` highest-scoring key blocks of each query block (last dim)."""
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    chosen = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)


def mass_blocks(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """bool mask with the fewest key blocks whose softmax probability sums to at least `mass`."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass: expected a probability in (0, 1], got {mass!r}")
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    needed = (probs.cumsum(dim=-1) - probs) < mass  # the mass before this block is still short
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, needed)


def attention_block_mass(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, *,
                         sm_scale: float | None = None, region_starts: Sequence[int] = (0,),
                         chunk_elements: int = 1 << 28) -> torch.Tensor:
    """Mean attention probability of each block pair, fp32 [B, Hq, Qb, Kb].

    The key blocks are cut into regions starting at the key-block indices `region_starts`; each
    row's softmax is normalised within each region, so that regions can be ranked apart (SparseD's
    prompt and answer). float16/bfloat16 CUDA tensors with block sizes the kernel takes
    (`block_mass_supports`) go to the Triton kernel; anything else to torch, whose query rows go in
    chunks of about `chunk_elements` logits.
    """
    _check_qk(q, k)
    length_q, length_k = q.shape[-2], k.shape[-2]
    blocks_k = -(-length_k // block_k)
    if not region_starts or region_starts[0] != 0 or list(region_starts) != sorted(set(region_starts)) \
            or region_starts[-1] >= blocks_k:
        raise ValueError(f"region_starts: expected increasing key-block indices starting at 0 and below "
                         f"{blocks_k}, got {list(region_starts)}")
    if block_mass_supports(q, k, block_q, block_k):
        sums = block_mass(q, k, block_q, block_k, sm_scale=sm_scale, region_starts=[int(s) for s in region_starts])
    else:
        sums = _block_mass_torch(q, k, block_q, block_k, sm_scale, region_starts, chunk_elements)
    sizes_q, sizes_k = _block_sizes(length_q, block_q, q.device), _block_sizes(length_k, block_k, q.device)
    return sums / (sizes_q[:, None] * sizes_k[None, :])


def _block_mass_torch(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, sm_scale: float | None,
                      region_starts: Sequence[int], chunk_elements: int) -> torch.Tensor:
    """The summed (not mean) probability per block pair, in float32 torch, `chunk_elements` logits at a time."""
    batch, heads, length_q, _ = q.shape
    length_k = k.shape[-2]
    blocks_k = -(-length_k // block_k)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    k = k.float().repeat_interleave(heads // k.shape[1], dim=1)
    column_edges = [start * block_k for start in region_starts] + [length_k]
    rows_per_chunk = max(1, chunk_elements // (batch * heads * length_k * block_q)) * block_q
    sums = []
    for row in range(0, length_q, rows_per_chunk):
        logits = q[:, :, row:row + rows_per_chunk].float() @ k.transpose(-1, -2) * scale
        probs = torch.cat([logits[..., lo:hi].softmax(dim=-1) for lo, hi in itertools.pairwise(column_edges)],
                          dim=-1)
        rows = probs.shape[-2]
        probs = F.pad(probs, (0, blocks_k * block_k - length_k, 0, -(-rows // block_q) * block_q - rows))
        sums.append(probs.unflatten(-1, (blocks_k, block_k)).unflatten(-3, (-1, block_q)).sum(dim=(-3, -1)))
    return torch.cat(sums, dim=-2)


class DynamicBlockSelection:
    """Layout provider: each call picks key blocks per query block from pooled q and k.

    Give `topk` (blocks per query block) or `mass` (smallest block set covering that share of the
    pooled attention). The layout is recomputed on every call, so it follows the data.
    """

    def __init__(self, *, topk: int | None = None, mass: float | None = None, block: int = 128):
        if (topk is None) == (mass is None):
            raise ValueError(f"topk, mass: give exactly one, got topk={topk!r}, mass={mass!r}")
        if topk is not None and (not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
        if mass is not None and not 0.0 < mass <= 1.0:
            raise ValueError(f"mass: expected a probability in (0, 1], got {mass!r}")
        self.topk, self.mass, self.block = topk, mass, block

    def __call__(self, q: torch.Tensor, k: torch.Tensor, layer: int) -> list[HeadGroup]:
        logits = pooled_block_logits(q, k, self.block, self.block)
        mask = topk_blocks(logits, self.topk) if self.topk is not None else mass_blocks(logits, self.mass)
        layout = BlockLayout(mask, q.shape[-2], k.shape[-2], self.block, self.block)
        return [HeadGroup(tuple(range(q.shape[1])), layout)]


def _block_sizes(length: int, block: int, device) -> torch.Tensor:
    """Token count of each block (the last one may be short), fp32."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block).float()


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k: expected [B, H, N, D] tensors, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k: shape {tuple(k.shape)} does not fit q {tuple(q.shape)} (same batch and head dim, "
                         f"query heads a multiple of key heads)")

