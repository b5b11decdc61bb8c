"""The masked diffusion LM (platform/dlm.py): its bound, its noise, its sampler, SparseD against dense,
and the bad input that `launch/generate.py` refuses before sampling."""

import importlib.util
import json
import math
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sparta.platform.config import ConfigError, JobConfig
from sparta.platform.data import TOKENIZER_PATH
from sparta.platform.dlm import (
    DiffusionLM,
    DLMConfig,
    SamplerConfig,
    SparseDConfig,
    check_sampler,
    draw_prompt_lengths,
    elbo_loss,
    generate,
    mask_tokens,
    sparsed_schedule,
    transfer_counts,
    unmask_most_confident,
    use_attention,
)
from sparta.platform.lm import LMConfig, TransformerLM
from sparta.platform.models import build_model, config_from_dict

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny(**overrides) -> DLMConfig:
    values = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=128, max_seq_len=128)
    return DLMConfig(**{**values, **overrides})


def test_elbo_weights_each_masked_cross_entropy_by_one_over_t_per_answer_token():
    logits = torch.zeros(2, 3, 4)
    logits[0, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    clean = torch.tensor([[0, 1, 2], [3, 3, 1]])
    masked = torch.tensor([[True, False, True], [False, True, False]])
    t = torch.tensor([0.5, 0.25])
    answer_len = torch.tensor([3, 2])  # sequence 1 has a one-token prompt
    ce_peaked = -2.0 + math.log(math.exp(2.0) + 3)  # target 0 under logits [2, 0, 0, 0]
    ce_uniform = math.log(4)
    expected = ((ce_peaked + ce_uniform) / 0.5 / 3 + ce_uniform / 0.25 / 2) / 2
    assert elbo_loss(logits, clean, masked, t, answer_len).item() == pytest.approx(expected, rel=1e-6)


def test_the_bound_of_a_model_that_knows_nothing_is_log_vocab_per_token():
    """A model with all-zero weights predicts uniformly: each masked token costs ln V, a sequence
    masks t * answer tokens on average, and the 1/t weight makes the expected loss ln V exactly,
    prompts or not."""
    torch.manual_seed(0)
    model = DiffusionLM(tiny(prompt_prob=0.5, d_model=32, n_layers=1))
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    clean = torch.randint(0, 64, (256, 32))
    losses = [model(clean, clean)[0].item() for _ in range(10)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(64), rel=0.03)


def test_prompt_tokens_are_never_masked_and_the_rest_at_rate_t():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 64, (512, 64))
    prompt_len = draw_prompt_lengths(clean.shape, 1.0, generator, CPU)
    assert prompt_len.min() >= 1 and prompt_len.max() <= 63
    assert (draw_prompt_lengths(clean.shape, 0.0, generator, CPU) == 0).all()
    noisy, masked, t = mask_tokens(clean, 64, prompt_len, generator)
    in_prompt = torch.arange(64)[None, :] < prompt_len[:, None]
    assert not masked[in_prompt].any() and (noisy[in_prompt] == clean[in_prompt]).all()
    assert (noisy[masked] == 64).all() and (noisy[~masked] == clean[~masked]).all()
    rate = masked.sum(1) / (64 - prompt_len)
    assert (rate - t).abs().mean() < 0.1  # each answer token masked with probability t


def test_validation_draws_the_same_noise_each_pass_and_training_does_not():
    torch.manual_seed(0)
    model = DiffusionLM(tiny())
    tokens = torch.randint(0, 64, (4, 32))
    model.eval()
    first = [model(tokens, tokens)[0].item() for _ in range(2)]
    model.train()
    trained = model(tokens, tokens)[0].item()
    model.eval()
    assert [model(tokens, tokens)[0].item() for _ in range(2)] == first
    assert first[0] != first[1] and trained not in first


def test_remasking_unmasks_the_most_confident_masked_positions():
    mask = 9
    block = torch.tensor([[mask, 5, mask, mask, mask], [mask, mask, 1, 2, 3]])
    prediction = torch.tensor([[1, 7, 2, 3, 4], [6, 7, 8, 8, 8]])
    confidence = torch.tensor([[0.9, 0.99, 0.2, 0.7, 0.1], [0.3, 0.4, 0.99, 0.99, 0.99]])
    out = unmask_most_confident(block, prediction, confidence, torch.tensor([2, 1]), mask)
    assert out.tolist() == [[1, 5, mask, 3, mask], [mask, 7, 1, 2, 3]]  # unmasked tokens are never replaced
    assert transfer_counts(torch.tensor([10, 7, 0]), 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]


def test_sampler_fills_every_mask_block_by_block_and_is_seeded():
    torch.manual_seed(0)
    model = DiffusionLM(tiny()).eval()
    prompt = torch.randint(0, 64, (2, 20))
    sampler = SamplerConfig(gen_len=24, steps=6, block_len=8, temperature=1.0, seed=3)
    seen = []
    answer = generate(model, prompt, sampler, on_step=seen.append)
    assert answer.shape == (2, 24) and (answer != model.mask_id).all() and seen == list(range(6))
    assert torch.equal(generate(model, prompt, sampler), answer)
    assert not torch.equal(generate(model, prompt, SamplerConfig(**{**asdict(sampler), "seed": 4})), answer)

    calls = []  # semi-autoregressive: while block b decodes, the blocks after it are all [MASK]
    logits = model.logits

    def watch(tokens, start, end):
        calls.append(((tokens[:, end:] == model.mask_id).all().item(), (tokens[:, 20:start] != model.mask_id).all().item()))
        return logits(tokens, start, end)

    model.logits = watch
    generate(model, prompt, sampler)
    assert calls == [(True, True)] * 6


def test_sparsed_with_every_block_kept_samples_what_dense_samples():
    """keep_ratio=1 keeps every block: through the reference path, the same samples as dense SDPA;
    a smaller keep ratio computes fewer blocks after the switch step."""
    torch.manual_seed(0)
    model = DiffusionLM(tiny()).eval()
    prompt = torch.randint(0, 64, (1, 96))
    sampler = SamplerConfig(gen_len=32, steps=8, block_len=16, attention="sparsed",
                            sparsed=SparseDConfig(skip_ratio=0.25, keep_ratio=1.0, block=16))
    dense = generate(model, prompt, sampler)
    schedule = sparsed_schedule(sampler, 96)
    use_attention(model, schedule, "reference")
    assert torch.equal(generate(model, prompt, sampler, schedule), dense)

    sampler.sparsed.keep_ratio = 0.5
    schedule = sparsed_schedule(sampler, 96)
    use_attention(model, schedule, "reference")
    generate(model, prompt, sampler, schedule)
    x = torch.cat([prompt, dense], dim=1)
    layouts = [block.attention.core.layout(None, None, layer)[0].layout for layer, block in enumerate(model.blocks)]
    # 6 prompt blocks keep 3, 2 answer blocks keep 1, per query block and head
    assert all(layout.density().tolist() == [0.5, 0.5] for layout in layouts)
    sparse_logits = model.logits(x)
    use_attention(model, None, "reference")
    assert (sparse_logits - model.logits(x)).abs().max() > 1e-6  # it does change the computation


@pytest.mark.parametrize("change, message", [
    ({"sparsed": SparseDConfig(keep_ratio=0.0)}, r"sparsed.keep_ratio=0.0: expected null or in \(0, 1\]"),
    ({"sparsed": SparseDConfig(keep_ratio=1.5)}, r"sparsed.keep_ratio=1.5: expected null or in \(0, 1\]"),
    ({"sparsed": SparseDConfig(block=48)}, r"sparsed.block=48: expected one of 16, 32, 64, 128"),
    ({"gen_len": 100}, r"block_len=32: expected a divisor of gen_len=100"),
    ({"steps": 6}, r"steps=6: expected a positive multiple of the 4 blocks"),
    ({"gen_len": 64, "block_len": 64, "steps": 8, "prompt_len": 100}, r"prompt: 100 tokens \+ gen_len=64 exceed the "
                                                                     r"context, model.max_seq_len=128"),
    ({"attention": "sparse"}, r"attention='sparse': expected one of dense, sparsed"),
    ({"attention": "sparsed", "backend": "triton"}, r"backend='triton': expected reference on a machine without a GPU"),
])
def test_sampler_settings_the_model_cannot_run_are_refused_naming_the_key(change, message):
    prompt_len = change.pop("prompt_len", 0)
    with pytest.raises(ValueError, match=message):
        check_sampler(SamplerConfig(**change), tiny(), prompt_len, CPU)


def test_the_triton_path_refuses_a_head_dim_its_kernels_lack():
    sampler = SamplerConfig(attention="sparsed", gen_len=32)
    check_sampler(sampler, tiny(), 10, torch.device("cuda"))  # head dim 32: fine
    with pytest.raises(ValueError, match=r"attention='sparsed': expected dense, or backend=reference: .* this model's is 24"):
        check_sampler(sampler, tiny(d_model=48), 10, torch.device("cuda"))


def compose_job(*overrides: str) -> JobConfig:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return JobConfig.from_dict(OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True))


def test_family_configs_validate_and_build_the_family():
    job = compose_job("experiment=dlm_smoke")
    cfg = job.model_config(2048, eot_id=0)
    assert isinstance(cfg, DLMConfig) and cfg.mask_id == 2048 and cfg.prompt_prob == 0.5
    model = build_model(cfg)
    assert isinstance(model, DiffusionLM) and model.embed.weight.shape[0] == 2049
    assert isinstance(config_from_dict(asdict(cfg)), DLMConfig)
    assert type(config_from_dict({k: v for k, v in asdict(LMConfig(64)).items() if k != "family"})) is LMConfig
    assert compose_job("experiment=dlm_long").model_config(8192).max_seq_len == 65536
    for override, message in [("model.prompt_prob=2", r"model.prompt_prob=2.0: expected in \[0, 1\]"),
                              ("model.family=gpt", r"model.family='gpt': expected one of lm, dlm")]:
        with pytest.raises(ConfigError, match=message):
            compose_job("experiment=dlm_smoke", override)
    with pytest.raises(ConfigError, match=r"model.prompt_prob: unknown key; allowed keys under model with model.family=lm"):
        compose_job("+model.prompt_prob=0.5")


def export_dir(root: Path, model, corpus_dir: Path) -> Path:
    """A model directory as launch/export.py writes it."""
    root.mkdir()
    save_file({name: param.detach() for name, param in model.named_parameters()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_config": asdict(model.cfg), "corpus_dir": str(corpus_dir),
                                                  "seq_len": 64, "mlflow_run_id": None, "step": 1}))
    shutil.copyfile(TOKENIZER_PATH, root / "tokenizer.json")
    return root


def generate_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "launch" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind, args, message", [
    ("lm", [], r"a checkpoint of model.family=lm; launch/generate.py samples model.family=dlm runs"),
    ("dlm", ["prompt=" + "def f(x): return x\n" * 40], r"prompt: \d+ tokens \+ gen_len=16 exceed the context, "
                                                        r"model.max_seq_len=128"),
    ("dlm", ["attention=sparsed", "sparsed.keep_ratio=0"], r"sparsed.keep_ratio=0.0: expected null or in \(0, 1\]"),
    ("dlm", ["sparsed.keep=0.3"], r"sparsed.keep: Key 'keep' not in 'SparseDConfig'"),
    ("dlm", ["prompt=a", "prompt_tokens=10"], r"prompt_tokens: give one of prompt, prompt_file, prompt_tokens"),
])
def test_generate_refuses_bad_input_before_sampling(tmp_path, capsys, kind, args, message):
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(2048, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)) if kind == "lm" \
        else DiffusionLM(tiny(vocab_size=2048))
    directory = export_dir(tmp_path / "model", model, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        generate_cli().main([str(directory), "gen_len=16", "block_len=16", "steps=4", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("generate: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
