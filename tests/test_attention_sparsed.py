"""SparseD schedule: dense before the switch, one mask per layer computed once and reused,
prompt and answer selected apart from the switch step's exact attention."""

import math

import pytest
import torch

from sparta.attention import SparseDSchedule, sparsed


@pytest.fixture
def count_selections(monkeypatch):
    """Counts the exact-attention passes (one per computed mask)."""
    calls = []
    real = sparsed.attention_block_mass

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparsed, "attention_block_mass", counted)
    return calls


def qk(seed, heads=2, tokens=80, dim=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, tokens, dim, generator=generator), torch.randn(1, heads, tokens, dim, generator=generator)


@pytest.mark.parametrize("steps, skip_ratio, switch", [(10, 0.2, 2), (12, 0.2, 3), (7, 0.0, 0), (5, 1.0, 5)])
def test_switch_step_is_ceil_of_skip_ratio_times_steps(steps, skip_ratio, switch):
    assert SparseDSchedule(steps, skip_ratio=skip_ratio).switch_step == switch


def test_dense_before_the_switch_then_one_mask_per_layer_reused(count_selections):
    schedule = SparseDSchedule(10, skip_ratio=0.2, block=16, prompt_len=30)
    layers = (0, 1)
    for step in range(schedule.switch_step):
        schedule.step = step
        for layer in layers:
            assert schedule(*qk(step), layer) is None
    assert count_selections == []
    first = {}
    for step in range(schedule.switch_step, 10):
        schedule.step = step
        for layer in layers:
            groups = schedule(*qk(100 + step), layer)  # later steps bring new q, k: the mask stays
            first.setdefault(layer, groups)
            assert groups is first[layer]
    assert len(count_selections) == len(layers)
    assert first[0][0].heads == (0, 1)
    # A new run starts dense again and recomputes at its switch step.
    schedule.step = 0
    assert schedule(*qk(0), 0) is None
    schedule.step = schedule.switch_step
    assert schedule(*qk(1), 0) is not first[0]
    assert len(count_selections) == len(layers) + 1


def test_mask_is_the_top_k_of_prompt_and_answer_apart_from_the_exact_attention():
    q, k = qk(7, tokens=90)  # blocks of 16: 6 key blocks; prompt of 40 tokens -> blocks 0..2 prompt
    schedule = SparseDSchedule(4, skip_ratio=0.25, keep_ratio=0.5, block=16, prompt_len=40)
    mask = schedule.select(q, k).mask
    logits = q @ k.transpose(-1, -2) / 8 ** 0.5
    regions = [(0, 48), (48, 90)]  # the block holding the prompt's end counts as prompt
    for lo, hi in regions:
        probs = logits[..., lo:hi].softmax(-1)
        blocks = range(lo // 16, -(-hi // 16))
        keep = math.ceil(0.5 * len(blocks))
        for h in range(2):
            for i in range(mask.shape[2]):
                rows = probs[0, h, i * 16:(i + 1) * 16]
                means = torch.stack([rows[:, (b * 16 - lo):min((b + 1) * 16, hi) - lo].mean() for b in blocks])
                chosen = {blocks[int(j)] for j in means.topk(keep).indices}
                assert {b for b in blocks if mask[0, h, i, b]} == chosen


@pytest.mark.parametrize("tokens, long_context, keep", [(96, 64, 0.3), (96, 128, 0.5)])
def test_default_keep_ratio_depends_on_the_context_length(tokens, long_context, keep):
    q, k = qk(3, tokens=tokens)
    mask = SparseDSchedule(4, block=16, long_context=long_context).select(q, k).mask
    assert (mask.sum(-1) == math.ceil(keep * 6)).all()


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=10, skip_ratio=1.5), "skip_ratio"),
    (dict(num_steps=10, keep_ratio=0.0), "keep_ratio"),
    (dict(num_steps=10, prompt_len=-1), "prompt_len"),
    (dict(num_steps=10, block=0), "block"),
])
def test_bad_schedule_is_a_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SparseDSchedule(**kwargs)


def test_bad_step_and_prompt_are_value_errors():
    schedule = SparseDSchedule(10, prompt_len=500, block=16)
    with pytest.raises(ValueError, match="step"):
        schedule.step = 10
    schedule.step = 5
    with pytest.raises(ValueError, match="prompt_len"):
        schedule(*qk(0), 0)
