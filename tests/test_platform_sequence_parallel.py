"""Sequence parallelism in the model families, without Ray: P gloo ranks each run their shard of the
same sequences (Ulysses all-to-alls around attention) and together give the single-process model's
loss and gradients; activation checkpointing changes neither.

The rule the trainer relies on: the mean over a sequence-parallel group of the ranks' losses is the
whole sequences' loss, and the mean of their gradients is its gradient (DeepSpeed then averages over
the world). MoE layers run with their auxiliary losses off: those are per-shard statistics (a load
balance over the shard's tokens), not shares of a whole-sequence loss.
Tolerance (fp32): 1e-5 relative for losses, 1e-5 of the largest entry for gradients (reduction order).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_cases import join_process_group

from sparta.moe import MoEConfig
from sparta.platform.dlm import DLMConfig
from sparta.platform.lm import LMConfig
from sparta.platform.models import build_model

VOCAB, SEQ, BATCH = 48, 16, 3
MOE = MoEConfig(router="topk", num_experts=4, top_k=2, d_ff=16, load_balance_coef=0.0, z_loss_coef=0.0)
CASES = {
    "lm": LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64, max_seq_len=SEQ),
    "lm-moe": LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=SEQ,
                       ffn="moe", moe=MOE, eot_id=0),
    "dlm": DLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=SEQ,
                     prompt_prob=0.5),
}


def loss_and_grads(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)  # the dLM's noise stream starts from the initial seed
    model.train()
    loss, _ = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def reference(name: str, tokens: torch.Tensor, checkpointed: bool = False):
    torch.manual_seed(0)
    model = build_model(CASES[name])
    for block in model.blocks:
        block.checkpointed = checkpointed
    return loss_and_grads(model, tokens)


def assert_matches(loss, grads, want_loss, want_grads, what: str) -> None:
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5), what
    for key, want in want_grads.items():
        error = (grads[key] - want).abs().max().item()
        assert error <= 1e-5 * want.abs().max().item() + 1e-8, f"{what}: gradient of {key} off by {error:.3g}"


def _rank(rank: int, init_file: str, world: int, tokens: torch.Tensor, references: dict):
    join_process_group(rank, init_file, world, "gloo")
    try:
        for name in CASES:
            torch.manual_seed(0)
            model = build_model(CASES[name], sp_group=dist.group.WORLD)
            loss, grads = loss_and_grads(model, tokens)
            dist.all_reduce(loss)
            for grad in grads.values():
                dist.all_reduce(grad)
            assert_matches(loss / world, {k: g / world for k, g in grads.items()}, *references[name],
                           f"{name} at sequence parallel {world}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_ranks_give_the_whole_sequences_loss_and_gradients(tmp_path, world):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    references = {name: reference(name, tokens) for name in CASES}  # one process, no process group
    mp.spawn(_rank, args=(str(tmp_path / "init"), world, tokens, references), nprocs=world, join=True)


@pytest.mark.parametrize("name", list(CASES))
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    assert_matches(*reference(name, tokens, checkpointed=True), *reference(name, tokens), name)
