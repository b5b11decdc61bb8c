"""The language model: shapes, causality, rotary embeddings, GQA."""

import pytest
import torch
import torch.nn.functional as F

from sparta.platform.lm import Attention, LMConfig, TransformerLM, apply_rotary, next_token_loss, rotary_tables


def tiny(**overrides) -> LMConfig:
    return LMConfig(**{"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                       "d_ff": 64, "max_seq_len": 32, **overrides})


def test_logits_shape_and_tied_embeddings():
    torch.manual_seed(0)
    model = TransformerLM(tiny())
    logits = model(torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    assert model.head.weight is model.embed.weight


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = TransformerLM(tiny()).eval()
    tokens = torch.randint(0, 97, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rotary_tables(64, 16, 10000.0)

    def score(i, j):
        return (apply_rotary(q, cos[i : i + 1], sin[i : i + 1]) * apply_rotary(k, cos[j : j + 1], sin[j : j + 1])).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 4))
    # rotation preserves the norm
    torch.testing.assert_close(apply_rotary(q, cos[5:6], sin[5:6]).norm(), q.norm())


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with 2 kv heads == full multi-head attention whose kv heads are those 2, each repeated."""
    torch.manual_seed(0)
    cfg = tiny()
    gqa = Attention(cfg)
    mha = Attention(tiny(n_kv_heads=4))
    head_dim = cfg.d_model // cfg.n_heads
    k_w, v_w = gqa.kv_proj.weight.view(2, 2, head_dim, cfg.d_model).unbind(0)  # [kv_head, head_dim, d]
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
        mha.kv_proj.weight.copy_(torch.cat([w.repeat_interleave(2, dim=0).reshape(-1, cfg.d_model) for w in (k_w, v_w)]))
    x = torch.randn(2, 10, cfg.d_model)
    cos, sin = rotary_tables(10, head_dim, cfg.rope_theta)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-5)


def test_next_token_loss_is_cross_entropy_and_trains():
    torch.manual_seed(0)
    model = TransformerLM(tiny())
    tokens = torch.randint(0, 97, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    expected = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1))
    torch.testing.assert_close(next_token_loss(logits, targets), expected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = next_token_loss(model(inputs), targets).item()
    for _ in range(30):
        loss = next_token_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_too_long_sequence_names_max_seq_len():
    model = TransformerLM(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
