"""Expert parallelism for the DeepSpeed engine of every Ray Train worker.

Ray Train has created the world process group. megatron-core's `parallel_state` cuts it into the
expert-parallel groups (ranks that share one copy of the experts, each holding `E / parallel.expert`
of them, rows travel between them by all-to-all) and the expert-data-parallel groups (ranks that
hold the same experts and average their gradients). Dense parameters are averaged over the whole
world, expert parameters over their expert-data group only.

DeepSpeed knows how to do that last part (its ZeRO 1/2 and bf16 optimizers reduce a parameter marked
`allreduce=False` over the expert-data group named by its `group_name`, dividing by the whole
data-parallel world so that the gradient does not depend on the layout), but it only turns the
machinery on when the model holds one of its own `deepspeed.moe.layer.MoE` layers. `ExpertGroups`
is such a layer with no parameters: DeepSpeed finds it, calls `set_deepspeed_parallelism`, and there
it registers megatron-core's groups under one name. The MoE layers themselves stay `sparta.moe.MoE`.
"""

import torch
import torch.distributed as dist
from torch import nn

from sparta.moe import MoE


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed expert weight: sharded over the expert-parallel group,
    first dimension = local experts."""
    return [(f"{name}.experts.{p_name}", p) for name, module in model.named_modules() if isinstance(module, MoE)
            for p_name, p in module.experts.named_parameters()]


def initialize_expert_parallel(expert_size: int) -> tuple[dist.ProcessGroup | None, "nn.Module | None"]:
    """Build the parallel groups once per worker; returns (expert-parallel group, DeepSpeed marker
    module to attach to the model), or (None, None) when every rank holds all experts."""
    if expert_size == 1:
        return None, None
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_size,
                                             create_gloo_process_groups=False)
    return parallel_state.get_expert_model_parallel_group(), _deepspeed_marker(
        parallel_state.get_expert_model_parallel_group(), parallel_state.get_expert_data_parallel_group())


def mark_expert_parameters(model: nn.Module, group_name: str) -> None:
    """The attributes DeepSpeed reads (`deepspeed.moe.utils.is_moe_param`, the optimizer's MoE groups)."""
    for _, param in expert_parameters(model):
        param.allreduce = False
        param.group_name = group_name


def _deepspeed_marker(ep_group, edp_group) -> nn.Module:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.utils import groups

    class ExpertGroups(DeepSpeedMoE):
        """Makes DeepSpeed's engine treat the model as an MoE model and hands it megatron-core's groups.

        DeepSpeed's MoE constructor builds experts and a gate; none are needed, so only
        `nn.Module.__init__` runs and the attributes the engine reads are set by hand."""

        def __init__(self):
            nn.Module.__init__(self)
            self.ep_size = dist.get_world_size(ep_group)
            self.expert_group_name = f"ep_size_{self.ep_size}"
            self.num_experts = 0  # read by DeepSpeed's logging only
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
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
