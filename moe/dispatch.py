"""Dispatch: sort the routed slots by expert, run the experts, sum the results back per token.

`build_plan` turns the router's slots into a `RoutingPlan` (the maps between tokens and
expert-sorted rows, see `sparta.kernels.moe_permute`), after `within_capacity` has dropped the slots
past an expert's capacity, if there is one; `build_plan_from_mask` does it for BlockFFN,
whose router gives a [tokens, experts] mask rather than k slots per token. `run_local` runs all
experts on this rank; `run_expert_parallel` shards them over an expert-parallel process group:
expert-sorted rows are already grouped by destination rank (experts are split in contiguous
ranges), so one `all_to_all_single` of the per-expert counts, then one of the rows (and their
routing weights), carries every row to the rank that owns its expert; the results come back in
the same order.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparta.kernels.moe_permute import permute, unpermute


@dataclass
class RoutingPlan:
    row_token: torch.Tensor        # [R] int32: token of each expert-sorted row, -1 = padding row (at the end)
    token_pos: torch.Tensor        # [T, S] int32: rows of each token's slots, -1 = not computed by an FFN expert
    row_weight: torch.Tensor       # [R] fp32 routing weight of each row, 0 for padding (differentiable)
    counts: torch.Tensor           # [E] int64 rows per expert
    offs: torch.Tensor             # [E] int32 cumulative end row per expert; offs[-1] = real rows


def within_capacity(slot_expert: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """[T, S] bool: the slot is kept, i.e. among the first capacity[e] slots routed to its expert e,
    first tokens first (GShard / Switch). capacity [E] int64 per expert id (MoE++: FFN and
    zero-computation experts); unused slots (-1) are kept, there is nothing to drop."""
    flat = slot_expert.reshape(-1)
    num_experts = capacity.shape[0]
    key = torch.where(flat >= 0, flat, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(1, num_experts + 1, device=flat.device))
    starts = torch.cat([ends.new_zeros(1), ends])  # of each expert, then of the unused slots
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[sorted_key]
    kept_sorted = (sorted_key == num_experts) | (rank_in_expert < F.pad(capacity, (0, 1))[sorted_key])
    return torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted).view_as(slot_expert)


def build_plan(slot_expert: torch.Tensor, slot_weight: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort the slots that go to FFN experts (ids in [0, num_experts)) by expert, in token order.

    Dropless: a capacity limit drops slots before (`within_capacity`, then -1 for the dropped ones).
    The buffer has one row per slot (T*S), real rows first and padding rows after, so nothing waits
    for the GPU.
    """
    num_tokens, slots = slot_expert.shape
    flat = slot_expert.reshape(-1)
    routed = (flat >= 0) & (flat < num_experts)
    sorted_key, order = torch.sort(torch.where(routed, flat, num_experts), stable=True)
    real = sorted_key < num_experts
    rows = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
    token_pos = torch.full_like(flat, -1, dtype=torch.int32)
    token_pos[order] = torch.where(real, rows, -1)
    ends = torch.searchsorted(sorted_key, torch.arange(1, num_experts + 1, device=flat.device))
    return RoutingPlan(
        row_token=torch.where(real, torch.div(order, slots, rounding_mode="floor"), -1).to(torch.int32),
        token_pos=token_pos.view(num_tokens, slots),
        row_weight=torch.where(real, slot_weight.reshape(-1)[order].float(), 0.0),
        counts=torch.diff(ends, prepend=ends.new_zeros(1)),
        offs=ends.to(torch.int32),
    )


def build_plan_from_mask(active: torch.Tensor, weight: torch.Tensor) -> RoutingPlan:
    """The plan of a router that chooses experts by a mask: BlockFFN, whose token t uses expert e
    iff active[t, e] ([T, E] bool), with weight[t, e] ([T, E] fp32, differentiable).

    Its rows are the active pairs, by expert then token: exactly `active.T.nonzero()`. That sizes
    the buffer to the real rows, at the cost of one host synchronisation (inside nonzero): with
    one slot per expert, T*E padded rows would cost far more than the few experts a token uses.
    Nothing sorts the T*E slots or scans them along the tokens (a scan over T with only E columns
    to share out runs nearly serially on a GPU); what follows the synchronisation is R-sized, and
    the only differentiable op is the gather of the R row weights. token_pos lists each token's
    rows first (ascending), then -1, so the un-permutation loops over the rows a token has, not
    over all E slots. Dropless.
    """
    num_tokens, num_experts = active.shape
    counts = active.sum(0)
    offs = counts.cumsum(0).to(torch.int32)
    slot_of_pair = active.cumsum(1) - 1  # place of an active pair among its token's pairs
    token_pos = torch.full((num_tokens, num_experts), -1, dtype=torch.int32, device=active.device)
    row_expert, row_token = active.t().nonzero().unbind(1)  # the synchronisation: the rest is launched before it
    pair = row_expert.add(row_token, alpha=num_experts)  # flat index of (token, expert)
    token_pos[row_token, slot_of_pair.reshape(-1)[pair]] = torch.arange(
        row_token.shape[0], dtype=torch.int32, device=active.device)
    return RoutingPlan(
        row_token=row_token.to(torch.int32),
        token_pos=token_pos,
        row_weight=weight.reshape(-1).gather(0, pair),
        counts=counts,
        offs=offs,
    )


def run_local(x: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
    """All experts on this rank: permute -> grouped experts -> weighted sum back ([T, d])."""
    rows = permute(x, plan.row_token, plan.token_pos)
    out = experts(rows, plan.row_weight, plan.offs)
    return unpermute(out, plan.row_token, plan.token_pos)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), *ctx.splits, ctx.group), None, None, None


def run_expert_parallel(x: torch.Tensor, plan: RoutingPlan, experts, group) -> torch.Tensor:
    """Experts sharded over `group` (rank r owns experts [r*E/P, (r+1)*E/P)); same result as
    `run_local` with all experts. The counts travel first, then the rows."""
    world = dist.get_world_size(group)
    num_local = plan.counts.shape[0] // world
    rows = permute(x, plan.row_token, plan.token_pos)
    recv_counts = torch.empty_like(plan.counts)
    dist.all_to_all_single(recv_counts, plan.counts, group=group)
    recv_counts = recv_counts.view(world, num_local)  # [source rank, local expert]
    send_splits = plan.counts.view(world, num_local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    real_rows = sum(send_splits)  # padding rows stay home
    recv_rows = _AllToAll.apply(rows[:real_rows], recv_splits, send_splits, group)
    recv_weight = _AllToAll.apply(plan.row_weight[:real_rows], recv_splits, send_splits, group)
    # Received rows are ordered (source rank, local expert); the grouped GEMM wants (local expert).
    local_expert = torch.arange(num_local, device=x.device).repeat(world)
    row_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1), output_size=sum(recv_splits))
    by_expert = torch.argsort(row_expert, stable=True)
    offs = torch.cumsum(recv_counts.sum(0), 0).to(torch.int32)
    out = experts(recv_rows[by_expert], recv_weight[by_expert], offs)
    out = out[torch.argsort(by_expert)]
    out_rows = _AllToAll.apply(out, send_splits, recv_splits, group)
    return unpermute(out_rows, plan.row_token[:real_rows], plan.token_pos)
