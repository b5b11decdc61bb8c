"""Sequence parallelism in the model families, without Ray: P gloo ranks each run their shard of the
same sequences or clips (Ulysses all-to-alls around attention) and together give the single-process
model's loss and gradients; activation checkpointing changes neither.

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
from sparta.platform.vdit import VDiTConfig

VOCAB, SEQ, BATCH = 48, 16, 3
MOE = MoEConfig(router="topk", num_experts=4, top_k=2, d_ff=16, load_balance_coef=0.0, z_loss_coef=0.0)
CASES = {
    "lm": LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64, max_seq_len=SEQ),
    "lm-moe": LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=SEQ,
                       ffn="moe", moe=MOE, eot_id=0),
    "dlm": DLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=SEQ,
                     prompt_prob=0.5),
    # 2 x 4 x 8 = 64 tokens in tiles of 16: at P=4 a rank holds one tile
    "vdit": VDiTConfig(frames=2, height=16, width=32, patch=(1, 4, 4), tile=(1, 2, 8), d_model=32, n_layers=2, n_heads=4),
}


def inputs(name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's training inputs: next-token windows, or clips and labels made from the same seed."""
    if name != "vdit":
        return tokens[:, :-1], tokens[:, 1:]
    generator = torch.Generator().manual_seed(int(tokens.sum()))
    return torch.randn(BATCH, 3, 2, 16, 32, generator=generator), torch.randint(0, 16, (BATCH,), generator=generator)


def build(name: str, sp_group=None):
    """The family's model from seed 0; the video DiT's AdaLN-zero modulations perturbed, so that every
    block computes something and every weight gets a gradient."""
    torch.manual_seed(0)
    model = build_model(CASES[name], sp_group=sp_group)
    if name == "vdit":
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def loss_and_grads(model, name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)  # the diffusion models' noise streams start from the initial seed
    model.train()
    loss, _ = model(*inputs(name, tokens))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def reference(name: str, tokens: torch.Tensor, checkpointed: bool = False):
    model = build(name)
    for block in model.blocks:
        block.checkpointed = checkpointed
    return loss_and_grads(model, name, tokens)


def assert_matches(loss, grads, want_loss, want_grads, what: str) -> None:
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5), what
    for key, want in want_grads.items():
        error = (grads[key] - want).abs().max().item()
        assert error <= 1e-5 * want.abs().max().item() + 1e-8, f"{what}: gradient of {key} off by {error:.3g}"


def _rank(rank: int, init_file: str, world: int, tokens: torch.Tensor, references: dict):
    join_process_group(rank, init_file, world, "gloo")
    try:
        for name in CASES:
            loss, grads = loss_and_grads(build(name, dist.group.WORLD), name, tokens)
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
