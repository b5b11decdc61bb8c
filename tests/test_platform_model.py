"""The language model: shapes, causality, rotary embeddings, GQA."""

import pytest
import torch
import torch.nn.functional as F

from sparta.moe import MoEConfig
from sparta.platform.lm import (
    Attention,
    LMConfig,
    TransformerLM,
    apply_rotary,
    document_ids,
    named_moe_metrics,
    next_token_loss,
    rotary_tables,
    run_blocks,
)


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


def test_rotary_tables_are_made_once_and_left_out_of_checkpoints():
    """fp32 buffers of model.max_seq_len rows, sliced by the forward; not state, so checkpoints hold what they held."""
    model = TransformerLM(tiny())
    cos, sin = rotary_tables(32, 8, model.cfg.rope_theta)
    torch.testing.assert_close(model.rotary_cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rotary_sin, sin, rtol=0, atol=0)
    assert not [key for key in model.state_dict() if "rotary" in key]


def test_too_long_sequence_names_max_seq_len():
    model = TransformerLM(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def moe_lm(router: str = "topk", **overrides) -> TransformerLM:
    moe = MoEConfig(router=router, num_experts=4, top_k=2, d_ff=16)
    return TransformerLM(tiny(ffn="moe", moe=moe, n_layers=4, eot_id=0, **overrides))


def test_moe_layers_are_placed_by_first_dense_layers_and_moe_every():
    torch.manual_seed(0)
    model = moe_lm(first_dense_layers=1, moe_every=2)
    assert model.moe_layers == [1, 3]
    assert [type(block.ffn).__name__ for block in model.blocks] == ["SwiGLU", "MoE", "SwiGLU", "MoE"]


def test_moe_metrics_stack_each_layers_own_stats_and_named_moe_metrics_names_them():
    """Layers 1 and 3 are MoE: row j of every `moe/layers/<stat>` is the j-th MoE layer's `aux` value, and
    `named_moe_metrics` turns the rows into `moe/layer_01/<stat>`, `moe/layer_03/<stat>` (floats, the load a
    vector) and adds the model-wide mean `moe/<stat>` of the floats."""
    torch.manual_seed(0)
    model = moe_lm("moepp", first_dense_layers=1, moe_every=2)
    tokens = torch.randint(1, 97, (2, 17))
    _, metrics = model(tokens[:, :-1], tokens[:, 1:])
    cos, sin = rotary_tables(16, 8, model.cfg.rope_theta)
    _, auxes = run_blocks(model.blocks, model.embed(tokens[:, :-1]), document_ids(tokens[:, :-1], 0), cos, sin)
    assert list(auxes) == [1, 3]
    for row, aux in enumerate(auxes.values()):
        for stat in ("tls", "cls8", "zero_fraction", "ffn_experts_per_token"):
            torch.testing.assert_close(metrics[f"moe/layers/{stat}"][row], aux.stats[stat].float())
        torch.testing.assert_close(metrics["moe/layers/expert_load"][row], aux.expert_load.float())

    named = named_moe_metrics({**metrics, "loss": 2.5}, model.moe_layers)
    assert named["loss"] == 2.5 and not any(key.startswith("moe/layers/") for key in named)
    assert named["moe/layer_03/tls"] == metrics["moe/layers/tls"][1].item()
    torch.testing.assert_close(named["moe/layer_01/expert_load"], metrics["moe/layers/expert_load"][0])
    assert named["moe/tls"] == (named["moe/layer_01/tls"] + named["moe/layer_03/tls"]) / 2
    assert "moe/expert_load" not in named
    with pytest.raises(ValueError):  # a stack of another model's layers
        named_moe_metrics(metrics, [1, 3, 5])


@pytest.mark.parametrize("router", ["topk", "blockffn", "moepp"])
def test_moe_lm_loss_is_cross_entropy_plus_the_aux_losses_and_trains(router):
    torch.manual_seed(0)
    model = moe_lm(router)
    tokens = torch.randint(1, 97, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss, metrics = model(inputs, targets)
    torch.testing.assert_close(metrics["loss"], next_token_loss(model(inputs), targets))
    torch.testing.assert_close(loss, metrics["loss"] + metrics["aux_loss"])
    assert metrics["aux_loss"] > 0
    layers = len(model.moe_layers)
    assert metrics["moe/layers/expert_load"].shape == (layers, 4)
    tls = metrics["moe/layers/tls"]
    assert tls.shape == (layers,) and 0 <= tls.min() and tls.max() <= 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(30):
        loss, _ = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.6 * first


def test_moepp_router_logits_travel_to_the_next_moe_layer():
    """Gating residual: each MoE++ layer after the first gets the previous one's router logits."""
    torch.manual_seed(0)
    model = moe_lm("moepp")
    received = []
    for layer in model.moe_layers:
        model.blocks[layer].ffn.register_forward_hook(
            lambda module, args, kwargs, out: received.append(kwargs["prev_router_logits"]), with_kwargs=True)
    model(torch.randint(1, 97, (2, 8)))
    assert received[0] is None and all(r is not None and r.shape == (2, 8, 8) for r in received[1:])


def test_document_ids_count_the_end_of_text_tokens_before_each_position():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    assert document_ids(tokens, eot_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_flops_per_token_counts_the_experts_a_token_uses():
    torch.manual_seed(0)
    dense = TransformerLM(tiny())
    matmul = sum(p.numel() for n, p in dense.blocks.named_parameters() if p.dim() >= 2) + 97 * 32
    attention = 12 * 2 * 32 * 16
    assert dense.flops_per_token(16) == 6 * matmul + attention
    moe = moe_lm()  # 4 MoE layers: router 4x32, 2 of 4 SwiGLU experts of (2*16 + 16) x 32
    per_layer_attention = sum(p.numel() for p in moe.blocks[0].attention.parameters())
    active = 4 * (per_layer_attention + 4 * 32 + 2 * 3 * 16 * 32) + 97 * 32
    assert moe.flops_per_token(16) == 6 * active + 12 * 4 * 32 * 16
    measured = {layer: 1.5 for layer in moe.moe_layers}  # e.g. drops, or BlockFFN's variable count
    assert moe.flops_per_token(16, measured) == 6 * (active - 4 * 0.5 * 3 * 16 * 32) + 12 * 4 * 32 * 16
