"""Layout-independent checkpoints with real DeepSpeed engines (one process, gloo): a resumed engine takes
exactly the steps the original would have taken, under every ZeRO stage, and a checkpoint loads across
stages. Expert-parallel layouts are covered end to end in test_platform_moe_e2e.py."""

import json
import os

import pytest
import torch
import torch.distributed as dist

from sparta.moe import MoEConfig
from sparta.platform import checkpoint
from sparta.platform.config import DeepSpeedConfig, LRScheduleConfig, OptimizerConfig, deepspeed_config
from sparta.platform.lm import LMConfig, TransformerLM
from sparta.platform.runs import load_model
from sparta.platform.worker import weight_decay_groups


@pytest.fixture(scope="module", autouse=True)
def process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29631", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def engine_for(zero_stage: int, seed: int = 0):
    """A 2-layer MoE++ LM (under ZeRO-3 too: the router's output is a named tuple, so ZeRO-3's hooks
    re-gather its weight for the backward)."""
    import deepspeed

    torch.manual_seed(seed)
    moe = MoEConfig(router="moepp", num_experts=4, top_k=2, d_ff=32)
    model = TransformerLM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64,
                                   max_seq_len=16, ffn="moe", moe=moe, eot_id=0))
    ds = DeepSpeedConfig(zero_stage, "fp32", 1.0, 1, 4, OptimizerConfig("adamw", 1e-2, (0.9, 0.95), 1e-8, 0.1),
                         LRScheduleConfig("warmup_cosine", 2, 0.1))
    config = deepspeed_config(ds, 20, use_gpu=False, world_size=1)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # ZeRO-3: even small weights come and go
    engine, *_ = deepspeed.initialize(model=model, model_parameters=weight_decay_groups(model, 0.1), config=config,
                                      dist_init_required=False)
    return engine, model


def batch(step: int):
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 64, (4, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(engine, steps) -> list[float]:
    losses = []
    for step in steps:
        loss, _ = engine(*batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("saved_stage, loaded_stage", [(0, 0), (1, 1), (2, 2), (3, 3), (2, 0), (1, 2), (2, 3)])
def test_resumed_engine_takes_the_same_steps(tmp_path, saved_stage, loaded_stage):
    engine, model = engine_for(saved_stage)
    train_steps(engine, range(5))
    checkpoint.save(engine, model, None, tmp_path, {"step": 5})
    expected = train_steps(engine, range(5, 9))

    resumed, resumed_model = engine_for(loaded_stage, seed=1)  # other initial weights: all must come from the file
    state = checkpoint.load(resumed, resumed_model, None, tmp_path)
    assert state["step"] == 5 and state["adam_step"] == 5
    # the next losses depend on the weights, Adam's moments and step count, and the LR schedule
    assert train_steps(resumed, range(5, 9)) == pytest.approx(expected, rel=1e-5)


def test_checkpoint_holds_whole_fp32_tensors_and_loads_as_a_model(tmp_path):
    engine, model = engine_for(2)
    train_steps(engine, range(3))
    checkpoint.save(engine, model, None, tmp_path, {"step": 3, "model_config": {}})
    from safetensors.torch import load_file

    weights, moments = load_file(tmp_path / checkpoint.MODEL_FILE), load_file(tmp_path / checkpoint.OPTIMIZER_FILE)
    for name, param in model.named_parameters():
        assert weights[name].dtype == torch.float32 and weights[name].shape == param.shape
        assert moments[f"{name}::exp_avg_sq"].shape == param.shape and moments[f"{name}::exp_avg_sq"].min() >= 0
    assert json.loads((tmp_path / checkpoint.STATE_FILE).read_text())["lr_scheduler"] is not None

    state = json.loads((tmp_path / checkpoint.STATE_FILE).read_text())
    from dataclasses import asdict

    state["model_config"] = asdict(model.cfg)
    (tmp_path / checkpoint.STATE_FILE).write_text(json.dumps(state))
    loaded, _ = load_model(tmp_path)
    tokens = batch(99)[0]
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    engine, model = engine_for(2)
    checkpoint.save(engine, model, None, tmp_path, {"step": 0})
    other = TransformerLM(LMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16))
    with pytest.raises(ValueError, match="do not match the model"):
        checkpoint.load_weights(other, __import__("safetensors.torch").torch.load_file(tmp_path / checkpoint.MODEL_FILE))
    with pytest.raises(FileNotFoundError, match="missing state.json"):
        (tmp_path / checkpoint.STATE_FILE).unlink()
        checkpoint.load(engine, model, None, tmp_path)


def test_a_checkpoint_cut_off_mid_write_is_never_loaded_and_only_keep_stay(tmp_path):
    """The writer's folders: a crash mid-write leaves a `.partial-<pid>` folder, which `latest` never
    returns and the next write deletes; at most `keep` complete checkpoints stay."""
    engine, model = engine_for(2)
    writer = checkpoint.CheckpointWriter(tmp_path, keep=2)
    for step in (10, 20):
        writer.submit(checkpoint.gather(engine, model, None, {"step": step}, writer.host_buffers()), step)
    writer.wait()
    cut_off = tmp_path / "checkpoint_00000030.partial-4242"  # a writer killed after its first file
    cut_off.mkdir()
    (cut_off / checkpoint.MODEL_FILE).write_bytes(b"\0" * 64)
    assert checkpoint.latest(tmp_path).name == "checkpoint_00000020"

    writer.submit(checkpoint.gather(engine, model, None, {"step": 40}, writer.host_buffers()), 40)
    writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000020", "checkpoint_00000040"]
    resumed, resumed_model = engine_for(2, seed=1)
    assert checkpoint.load(resumed, resumed_model, None, checkpoint.latest(tmp_path))["step"] == 40


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_snapshot_keeps_the_step_it_was_taken_at_while_training_goes_on(tmp_path, zero_stage):
    """The writer writes in the background while training changes the weights and moments in place.
    Under ZeRO-0 on the CPU they are the optimizer's own tensors: the snapshot must be a copy, so the
    checkpoint of step 2 holds step 2's state, and the next snapshot refills the same buffers only after
    the previous one is written."""
    from safetensors.torch import load_file

    engine, model = engine_for(zero_stage)
    writer = checkpoint.CheckpointWriter(tmp_path, keep=2)
    train_steps(engine, range(2))
    snapshot = checkpoint.gather(engine, model, None, {"step": 2}, writer.host_buffers())
    at_step_2 = {name: value.clone() for name, value in snapshot.weights.items()}
    train_steps(engine, range(2, 4))
    writer.submit(snapshot, 2)
    writer.submit(checkpoint.gather(engine, model, None, {"step": 4}, writer.host_buffers()), 4)
    writer.wait()

    written_2 = load_file(checkpoint.checkpoint_dir(tmp_path, 2) / checkpoint.MODEL_FILE)
    written_4 = load_file(checkpoint.checkpoint_dir(tmp_path, 4) / checkpoint.MODEL_FILE)
    for name, param in model.named_parameters():
        torch.testing.assert_close(written_2[name], at_step_2[name], rtol=0, atol=0)
        torch.testing.assert_close(written_4[name], param.detach().float(), rtol=0, atol=0)
    assert any(not torch.equal(written_2[name], written_4[name]) for name in written_2)
