"""ZeRO-3 with expert parallelism, without Ray: 4 gloo ranks as expert 2 x data 2, every weight partitioned
(dense ones over all 4 ranks, each rank's experts over the 2 ranks that hold the same experts) and
released after use, train the losses of the same MoE LM at expert 1 under ZeRO-2. Tolerance: 1e-5
relative (reduction order)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparta.moe import MoEConfig
from sparta.platform.config import DeepSpeedConfig, LRScheduleConfig, OptimizerConfig, deepspeed_config
from sparta.platform.lm import LMConfig
from sparta.platform.models import build_model
from sparta.platform.parallel import initialize_parallel, mark_expert_parameters
from sparta.platform.worker import weight_decay_groups

WORLD, STEPS = 4, 5


def _rank(rank: int, init_file: str, expert: int, zero_stage: int, losses):
    import deepspeed
    from megatron.core import parallel_state

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        layout = initialize_parallel(expert, 1, zero_stage)
        torch.manual_seed(0)
        cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=16,
                       ffn="moe", moe=MoEConfig(router="moepp", num_experts=4, top_k=2, d_ff=16), eot_id=0)
        model = build_model(cfg, layout.ep_group)
        if layout.expert_groups is not None:
            model.add_module("expert_groups", layout.expert_groups)
            mark_expert_parameters(model, layout.expert_groups.expert_group_name)
        ds = DeepSpeedConfig(zero_stage, "fp32", 1.0, 1, 2, OptimizerConfig("adamw", 1e-2, (0.9, 0.95), 1e-8, 0.1),
                             LRScheduleConfig("warmup_cosine", 2, 0.1))
        config = deepspeed_config(ds, 20, use_gpu=False, world_size=WORLD)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # even small weights come and go
        engine, *_ = deepspeed.initialize(model=model, model_parameters=weight_decay_groups(model, 0.1), config=config,
                                          dist_init_required=False)
        for step in range(STEPS):
            tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(100 * step + rank))
            loss, _ = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                losses.append(mean.item() / WORLD)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def losses_of(tmp_path, expert: int, zero_stage: int) -> list[float]:
    with mp.Manager() as manager:
        losses = manager.list()
        mp.spawn(_rank, args=(str(tmp_path / f"init-{expert}-{zero_stage}"), expert, zero_stage, losses), nprocs=WORLD,
                 join=True)
        return list(losses)


def test_zero3_with_expert_parallelism_trains_the_losses_of_zero2_without_it(tmp_path):
    reference = losses_of(tmp_path, expert=1, zero_stage=2)
    assert len(reference) == STEPS and reference[-1] != reference[0]
    assert losses_of(tmp_path, expert=2, zero_stage=3) == pytest.approx(reference, rel=1e-5)
