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

Under `torch.compile` the two steps whose sizes only the data knows are custom ops with
data-dependent output sizes: BlockFFN's `nonzero` of the active pairs, and the expert-parallel
exchange of rows, whose split sizes a rank learns from the counts. Their host synchronisation
(the same as eager) stays inside the ops, and new routing does not recompile. The counts travel
by a functional collective (fixed splits).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
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
    row_expert, row_token = _active_pairs(active.t())  # the synchronisation: the rest is launched before it
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


@torch.library.custom_op("sparta::moe_active_pairs", mutates_args=())
def _active_pairs_op(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = mask.nonzero().unbind(1)
    return rows.clone(), columns.clone()  # views of one tensor cannot be a custom op's outputs


@_active_pairs_op.register_fake
def _(mask):
    pairs = torch.library.get_ctx().new_dynamic_size(max=mask.numel())
    return mask.new_empty(pairs, dtype=torch.int64), mask.new_empty(pairs, dtype=torch.int64)


def _active_pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, column indices) of the True entries of a 2-D mask, in row-major order: `nonzero`,
    which torch.compile traces only in a full graph, hence an op of its own there."""
    if torch.compiler.is_compiling():
        return _active_pairs_op(mask)
    return mask.nonzero().unbind(1)


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


def _experts_on_received(rows, weight, recv_counts, row_expert, experts):
    """Run the local experts on received rows ordered (source rank, local expert); results in that order.
    recv_counts [source rank, local expert]; row_expert: the local expert of each row."""
    by_expert = torch.argsort(row_expert, stable=True)
    offs = torch.cumsum(recv_counts.sum(0), 0).to(torch.int32)
    out = experts(rows[by_expert], weight[by_expert], offs)
    return out[torch.argsort(by_expert)]


def run_expert_parallel(x: torch.Tensor, plan: RoutingPlan, experts, group) -> torch.Tensor:
    """Experts sharded over `group` (rank r owns experts [r*E/P, (r+1)*E/P)); same result as
    `run_local` with all experts. The counts travel first, then the rows."""
    if torch.compiler.is_compiling():
        return _run_expert_parallel_traced(x, plan, experts, group)
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
    local_expert = torch.arange(num_local, device=x.device).repeat(world)
    row_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1), output_size=sum(recv_splits))
    out = _experts_on_received(recv_rows, recv_weight, recv_counts, row_expert, experts)
    out_rows = _AllToAll.apply(out, send_splits, recv_splits, group)
    return unpermute(out_rows, plan.row_token[:real_rows], plan.token_pos)


# torch.compile's version of the exchange. The split sizes are copied to the host once (the one
# synchronisation, as the eager `tolist`) and only the ops read them; the number of received rows is a
# data-dependent size, and the rows coming back fill a buffer of the plan's static size (padding rows,
# never read, at the end).
@torch.library.custom_op("sparta::moe_received_row_experts", mutates_args=())
def _received_row_experts_op(recv_counts: torch.Tensor, host_splits: torch.Tensor) -> torch.Tensor:
    """recv_counts [source rank, local expert] -> the local expert of every received row;
    host_splits [2, ranks] on the CPU: rows sent to, received from each rank."""
    local_expert = torch.arange(recv_counts.shape[1], device=recv_counts.device).repeat(recv_counts.shape[0])
    return torch.repeat_interleave(local_expert, recv_counts.reshape(-1), output_size=int(host_splits[1].sum()))


@_received_row_experts_op.register_fake
def _(recv_counts, host_splits):
    return recv_counts.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


@torch.library.custom_op("sparta::moe_all_to_all", mutates_args=())
def _all_to_all_op(x: torch.Tensor, send_splits: torch.Tensor, recv_splits: torch.Tensor, out_rows: int,
                   group_name: str) -> torch.Tensor:
    """Send x's first sum(send_splits) rows, split by destination rank; the received rows, by source rank,
    fill the first sum(recv_splits) of out_rows rows (the rest is zero). The splits are CPU tensors."""
    send, recv = send_splits.tolist(), recv_splits.tolist()
    out = x.new_empty(out_rows, *x.shape[1:])
    received = sum(recv)
    dist.all_to_all_single(out[:received], x[:sum(send)].contiguous(), recv, send,
                           group=dist.distributed_c10d._resolve_process_group(group_name))
    out[received:].zero_()
    return out


@_all_to_all_op.register_fake
def _(x, send_splits, recv_splits, out_rows, group_name):
    return x.new_empty(out_rows, *x.shape[1:])


def _all_to_all_op_setup(ctx, inputs, output):
    x, send_splits, recv_splits, _, ctx.group_name = inputs
    ctx.save_for_backward(send_splits, recv_splits)
    ctx.in_rows = x.shape[0]


def _all_to_all_op_backward(ctx, grad):
    send_splits, recv_splits = ctx.saved_tensors
    return _all_to_all_op(grad, recv_splits, send_splits, ctx.in_rows, ctx.group_name), None, None, None, None


_all_to_all_op.register_autograd(_all_to_all_op_backward, setup_context=_all_to_all_op_setup)


def _run_expert_parallel_traced(x: torch.Tensor, plan: RoutingPlan, experts, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    num_local = plan.counts.shape[0] // world
    rows = permute(x, plan.row_token, plan.token_pos)
    recv_counts = funcol.all_to_all_single(plan.counts, None, None, group)
    recv_counts = funcol.wait_tensor(recv_counts).view(world, num_local)
    host_splits = torch.stack([plan.counts.view(world, num_local).sum(1), recv_counts.sum(1)]).cpu()
    send_splits, recv_splits = host_splits.unbind()
    row_expert = _received_row_experts_op(recv_counts, host_splits)
    received, name = row_expert.shape[0], group.group_name
    recv_rows = _all_to_all_op(rows, send_splits, recv_splits, received, name)
    recv_weight = _all_to_all_op(plan.row_weight, send_splits, recv_splits, received, name)
    out = _experts_on_received(recv_rows, recv_weight, recv_counts, row_expert, experts)
    out_rows = _all_to_all_op(out, recv_splits, send_splits, rows.shape[0], name)
    return unpermute(out_rows, plan.row_token, plan.token_pos)
