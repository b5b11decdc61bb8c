"""DeepSpeed-Ulysses sequence parallelism: all-to-alls between sequence shards and head shards.

Rank r of a sequence-parallel group of P ranks holds tokens [r * N/P, (r+1) * N/P) of every
sequence. Attention needs whole sequences, so `sequence_to_heads` trades them for whole heads:
afterwards rank r holds heads [r * H/P, (r+1) * H/P) of all N tokens; `heads_to_sequence` is the
way back. Each is one all-to-all whose backward is the other one (a functional collective, so it
is differentiable and traceable by torch.compile).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def sequence_shard(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of the global sequence along `dim` (a view)."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % ranks:
        raise ValueError(f"x: {x.shape[dim]} tokens (dim {dim}) do not split evenly over {ranks} sequence-parallel ranks")
    size = x.shape[dim] // ranks
    return x.narrow(dim, rank * size, size)


def sequence_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """The inverse of `sequence_shard`: every rank's shard along `dim`, in rank order (differentiable)."""
    return funcol.all_gather_tensor_autograd(x.contiguous(), dim, group)


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, N/P, D] (all heads, this rank's tokens) -> [B, H/P, N, D] (this rank's heads, all tokens)."""
    ranks = dist.get_world_size(group)
    if x.dim() != 4 or x.shape[1] % ranks:
        raise ValueError(f"x: expected [B, H, N/P, D] with H divisible by the {ranks} sequence-parallel ranks, "
                         f"got shape {tuple(x.shape)}")
    return _all_to_all(x, group, scatter_dim=1, gather_dim=2)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H/P, N, D] (this rank's heads, all tokens) -> [B, H, N/P, D] (all heads, this rank's tokens)."""
    ranks = dist.get_world_size(group)
    if x.dim() != 4 or x.shape[2] % ranks:
        raise ValueError(f"x: expected [B, H/P, N, D] with N divisible by the {ranks} sequence-parallel ranks, "
                         f"got shape {tuple(x.shape)}")
    return _all_to_all(x, group, scatter_dim=2, gather_dim=1)


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Cut x into P equal chunks along `scatter_dim`, send chunk j to rank j, and join the chunks
    received along `gather_dim`, in the order of the ranks that sent them."""
    ranks = dist.get_world_size(group)
    send = x.unflatten(scatter_dim, (ranks, -1)).movedim(scatter_dim, 0).contiguous()
    received = funcol.all_to_all_single_autograd(send, None, None, group)
    return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)
