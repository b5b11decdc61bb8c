"""The parallel layout of the Ray Train workers: data x expert x sequence, for their DeepSpeed engines.

Ray Train has created the world process group. megatron-core's `parallel_state` cuts it once per
worker (its context-parallel groups are our sequence-parallel groups):
- sequence-parallel groups (`parallel.sequence` neighbouring ranks): they read the same samples,
  each holds a contiguous shard of every sequence, and attention exchanges sequence shards for head
  shards by all-to-all (DeepSpeed-Ulysses); the data shards are the groups, not the ranks;
- expert-parallel groups (`parallel.expert` neighbouring ranks): they share one copy of the experts,
  each holding `E / parallel.expert` of them; rows travel between them by all-to-all (an expert group
  may coincide with a sequence group: its ranks hold different tokens either way);
- expert-data-parallel groups: the ranks that hold the same experts and average their gradients.
Dense parameters are averaged over the whole world, expert parameters over their expert-data group
only. Each rank's loss is its shard's share, scaled so that the mean over a sequence group is the
whole sequence's loss: then the world average that DeepSpeed takes is the gradient of the global batch.

Why megatron-core and not DeepSpeed's groups: `parallel_state` builds every group of the layout in one
call, with the rank order that expert and context parallelism share in Megatron; DeepSpeed only
builds expert groups, and only from inside `deepspeed.initialize`.

DeepSpeed knows how to do that last part (its ZeRO 1/2 and bf16 optimizers reduce a parameter marked
`allreduce=False` over the expert-data group named by its `group_name`, dividing by the whole
data-parallel world so that the gradient does not depend on the layout), but it only turns the
machinery on when the model holds one of its own `deepspeed.moe.layer.MoE` layers. `ExpertGroups`
is such a layer with no parameters: DeepSpeed finds it, calls `set_deepspeed_parallelism`, and there
it registers megatron-core's groups under one name. The MoE layers themselves stay `sparta.moe.MoE`.
Under ZeRO-3, DeepSpeed 0.19 takes experts only from its AutoEP layers: there it partitions a weight
marked `ds_zero_placement_family="autoep_expert"` over its expert-data group (the other weights over
the whole world), so under ZeRO-3 `ExpertGroups` is an AutoEP layer instead, with the same groups.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparta.moe import MoE


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed expert weight: sharded over the expert-parallel group,
    first dimension = local experts."""
    return [(f"{name}.experts.{p_name}", p) for name, module in model.named_modules() if isinstance(module, MoE)
            for p_name, p in module.experts.named_parameters()]


@dataclass
class Layout:
    """This rank's place in the layout. `data_rank` of `data_shards` picks its samples; a group is None
    where that dimension is 1; `expert_groups` is the DeepSpeed marker module (with expert groups)."""
    data_rank: int
    data_shards: int
    ep_group: dist.ProcessGroup | None = None
    sp_group: dist.ProcessGroup | None = None
    expert_groups: nn.Module | None = None


def initialize_parallel(expert: int, sequence: int, zero_stage: int) -> Layout:
    """Build the parallel groups once per worker (the world group exists)."""
    if expert == 1 and sequence == 1:
        return Layout(dist.get_rank(), dist.get_world_size())
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=sequence, expert_model_parallel_size=expert,
                                 create_gloo_process_groups=False)
    layout = Layout(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    if sequence > 1:
        layout.sp_group = ps.get_context_parallel_group()
    if expert > 1:
        layout.ep_group = ps.get_expert_model_parallel_group()
        layout.expert_groups = _deepspeed_marker(layout.ep_group, ps.get_expert_data_parallel_group(), zero_stage)
    return layout


def mark_expert_parameters(model: nn.Module, group_name: str) -> None:
    """The attributes DeepSpeed reads (`deepspeed.moe.utils.is_moe_param`, the optimizer's MoE groups, and
    ZeRO-3's partition group)."""
    for _, param in expert_parameters(model):
        param.allreduce = False
        param.group_name = group_name
        param.ds_zero_placement_family = "autoep_expert"


def _deepspeed_marker(ep_group, edp_group, zero_stage: int) -> nn.Module:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.utils import groups

    class ExpertGroups(AutoEPMoELayer if zero_stage == 3 else DeepSpeedMoE):
        """Makes DeepSpeed's engine treat the model as an MoE model and hands it megatron-core's groups.

        Either base's constructor builds experts and a gate; none are needed, so only
        `nn.Module.__init__` runs and the attributes the engine reads are set by hand."""

        def __init__(self):
            nn.Module.__init__(self)
            self.ep_size = dist.get_world_size(ep_group)
            self.expert_group_name = f"ep_size_{self.ep_size}"
            self.num_experts = 0  # read by DeepSpeed's logging only
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False, folding_group_handles=None):
            groups._EXPERT_PARALLEL_GROUP[self.expert_group_name] = ep_group
            groups._EXPERT_DATA_PARALLEL_GROUP[self.expert_group_name] = edp_group
            groups._EXPERT_PARALLEL_GROUP_RANKS[self.expert_group_name] = dist.get_process_group_ranks(ep_group)
            groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[self.expert_group_name] = dist.get_process_group_ranks(edp_group)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertGroups only describes the parallel layout to DeepSpeed; it has no forward")

    return ExpertGroups()


def gather_experts(tensor: torch.Tensor, ep_group) -> torch.Tensor:
    """This rank's experts [E/P, ...] -> all experts [E, ...] (rank order = expert order)."""
    if ep_group is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(parts, tensor.contiguous(), group=ep_group)
    return torch.cat(parts)


def local_experts(tensor: torch.Tensor, ep_group) -> torch.Tensor:
    """All experts [E, ...] -> this rank's contiguous range [E/P, ...]."""
    if ep_group is None:
        return tensor
    return tensor.chunk(dist.get_world_size(ep_group))[dist.get_rank(ep_group)]
