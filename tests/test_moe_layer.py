"""The MoE layer: dropless grouped path vs a naive per-token loop, MoE++ semantics, metrics,
capacity dropping (MoE++'s heterogeneous capacities included), aux-loss-free balancing, per-router
expert defaults and config errors.

Tolerances: fp32 layer vs fp32 loop 1e-5 (max abs error / max abs value); bf16 layer vs fp32 loop
on the same (bf16-rounded) inputs 3e-2 for the output and 5e-2 for gradients (bf16 has 8 bits of
mantissa and the two paths round at different places).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from moe_cases import top1_by_basis_direction

from sparta.kernels.moe_reference import activation_reference, moe_ffn_token_loop
from sparta.moe import CLS_CHUNK_SIZES, MoE, MoEConfig, load_summary
from sparta.moe.dispatch import build_plan, build_plan_from_mask, within_capacity
from sparta.moe.metrics import chunk_level_sparsity, routing_stats

CONFIGS = {
    "topk-swiglu-shared": MoEConfig(router="topk", num_experts=6, top_k=2, d_ff=16, num_shared_experts=1),
    "topk-sigmoid-gelu": MoEConfig(router="topk", num_experts=4, top_k=3, d_ff=8, activation="gelu",
                                   score_func="sigmoid"),
    "blockffn-silu": MoEConfig(router="blockffn", num_experts=6, d_ff=16, activation="silu", chunk_size=4),
    "moepp-relu": MoEConfig(router="moepp", num_experts=4, top_k=2, d_ff=16, activation="relu",
                            num_zero_experts=1, num_copy_experts=1, num_constant_experts=2),
}


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def token_loop_reference(layer, x, prev_router_logits=None):
    """The layer's function written the slow, obvious way: for every token and slot,
    weight * expert(x_t), with the zero-computation and shared experts spelled out per token."""
    cfg = layer.config
    batch, seq, d = x.shape
    tokens = x.reshape(-1, d)
    routing = layer.router(tokens, (batch, seq), prev_router_logits)
    ffn_slot = torch.where(routing.slot_expert < cfg.num_experts, routing.slot_expert, -1)
    y = moe_ffn_token_loop(tokens, ffn_slot, routing.slot_weight, layer.experts.w_in.to(x.dtype),
                           layer.experts.w_out.to(x.dtype), cfg.activation).float()
    zc = layer.zero_computation
    extra = []
    for t in range(tokens.shape[0]):
        out = torch.zeros(d)
        for j in range(routing.slot_expert.shape[1]):
            e, w = int(routing.slot_expert[t, j]), routing.slot_weight[t, j]
            if zc is not None and zc.first_copy <= e < zc.first_constant:
                out = out + w * tokens[t].float()
            elif zc is not None and e >= zc.first_constant:
                c = e - zc.first_constant
                mix = (zc.constant_gate[2 * c:2 * c + 2].float() @ tokens[t].float()).softmax(-1)
                out = out + w * (mix[0] * tokens[t].float() + mix[1] * zc.constant[c].float())
        extra.append(out)
    y = y + torch.stack(extra)
    if layer.shared is not None:
        hidden = activation_reference(tokens @ layer.shared.w_in.t(), cfg.activation)
        y = y + hidden @ layer.shared.w_out.t().float()
    return y.view(batch, seq, d)


def grads(layer, x, out, grad_out):
    inputs = [x] + list(layer.parameters())
    found = torch.autograd.grad((out.float() * grad_out).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_path_matches_token_loop_fp32(name):
    torch.manual_seed(0)
    layer = MoE(12, CONFIGS[name])
    x = torch.randn(2, 9, 12, requires_grad=True)
    y, _ = layer(x)
    ref = token_loop_reference(layer, x)
    assert relative_error(y, ref) < 1e-5
    grad_out = torch.randn_like(ref)
    names = ["x"] + [n for n, p in layer.named_parameters()]
    for what, g, g_ref in zip(names, grads(layer, x, y, grad_out), grads(layer, x, ref, grad_out)):
        assert relative_error(g, g_ref) < 1e-5, what


@pytest.mark.parametrize("name", ["topk-swiglu-shared", "moepp-relu"])
def test_grouped_path_matches_token_loop_bf16(name):
    torch.manual_seed(1)
    layer = MoE(16, CONFIGS[name])
    x = torch.randn(2, 8, 16).bfloat16()
    reference_layer = MoE(16, CONFIGS[name])
    reference_layer.load_state_dict(layer.state_dict())
    layer.bfloat16()
    for p in reference_layer.parameters():  # the same bf16-rounded values, in fp32
        p.data = p.data.bfloat16().float()
    x_bf16 = x.clone().requires_grad_()
    x_fp32 = x.float().requires_grad_()
    y, _ = layer(x_bf16)
    ref = token_loop_reference(reference_layer, x_fp32)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, ref) < 3e-2
    grad_out = torch.randn_like(ref)
    for g, g_ref in zip(grads(layer, x_bf16, y, grad_out), grads(reference_layer, x_fp32, ref, grad_out)):
        assert relative_error(g, g_ref) < 5e-2


def test_build_plan_hand_case():
    # 2 FFN experts; id 3 is a zero-computation expert and -1 an unused slot: neither gets a row.
    slot_expert = torch.tensor([[1, -1], [0, 1], [3, 0]])
    slot_weight = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    plan = build_plan(slot_expert, slot_weight, num_experts=2)
    assert plan.row_token.tolist() == [1, 2, 0, 1, -1, -1]  # expert 0 rows, expert 1 rows, padding
    assert plan.token_pos.tolist() == [[2, -1], [0, 3], [-1, 1]]
    assert plan.offs.tolist() == [2, 4] and plan.counts.tolist() == [2, 2]
    torch.testing.assert_close(plan.row_weight, torch.tensor([0.3, 0.6, 0.1, 0.4, 0.0, 0.0]))
    # Capacity 1 for the FFN experts 0, 1, 2 for expert 3: the first slot of each expert is kept.
    kept = within_capacity(slot_expert, torch.tensor([1, 1, 0, 2]))
    assert kept.tolist() == [[True, True], [True, False], [True, False]]
    capped = build_plan(torch.where(kept, slot_expert, -1), slot_weight, num_experts=2)
    assert capped.row_token.tolist() == [1, 0, -1, -1, -1, -1]


def test_build_plan_from_mask_hand_case():
    active = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    weight = (10 * torch.arange(3.0)[:, None] + torch.arange(1.0, 4.0)).requires_grad_()  # w[t, e] = 10 t + e + 1
    plan = build_plan_from_mask(active, weight)
    # Rows by expert, then token: (e0: t0, t2), (e1: t2), (e2: t0, t1); no padding rows.
    assert plan.row_token.tolist() == [0, 2, 2, 0, 1]
    assert plan.counts.tolist() == [2, 1, 2] and plan.offs.tolist() == [2, 3, 5]
    assert plan.token_pos.tolist() == [[0, 3, -1], [4, -1, -1], [1, 2, -1]]  # each token's rows, then -1
    assert plan.row_token.dtype == plan.token_pos.dtype == plan.offs.dtype == torch.int32
    assert plan.row_weight.tolist() == [1.0, 21.0, 22.0, 3.0, 13.0]
    plan.row_weight.sum().backward()
    assert torch.equal(weight.grad, active.float())
    empty = build_plan_from_mask(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3))
    assert empty.row_token.numel() == 0 and empty.offs.tolist() == [0, 0, 0]
    assert empty.token_pos.tolist() == [[-1] * 3] * 2


def basis_tokens(expert_of_token, width):
    """Tokens e_{expert}: with router weight 10 * I, token t is routed to expert_of_token[t] first."""
    return F.one_hot(torch.tensor(expert_of_token), width).float()


def test_moepp_zero_copy_constant_semantics():
    # FFN experts 0, 1; zero 2; copy 3; constant 4. top-1, so the selected gate renormalises to 1.
    cfg = MoEConfig(router="moepp", num_experts=2, top_k=1, d_ff=8, num_zero_experts=1, num_copy_experts=1,
                    num_constant_experts=1, gating_residual=False)
    layer = MoE(5, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(5))
    x = basis_tokens([2, 3, 4, 0], 5)[None] * torch.tensor([1.0, 1.5, 2.0, 1.0])[None, :, None]
    y, aux = layer(x)
    assert torch.equal(y[0, 0], torch.zeros(5))          # zero expert: discard
    assert torch.equal(y[0, 1], x[0, 1])                 # copy expert: skip
    zc = layer.zero_computation
    mix = (zc.constant_gate @ x[0, 2]).softmax(-1)
    torch.testing.assert_close(y[0, 2], mix[0] * x[0, 2] + mix[1] * zc.constant[0])  # constant: replace
    assert y[0, 3].abs().sum() > 0                       # FFN expert 0
    assert aux.stats["zero_fraction"].item() == aux.stats["copy_fraction"].item() == 0.25
    assert aux.stats["constant_fraction"].item() == 0.25
    assert aux.stats["zero_slot_fraction"].item() == aux.stats["constant_slot_fraction"].item() == 0.25  # top-1
    assert aux.stats["ffn_experts_per_token"].item() == 0.25
    assert aux.stats["tls"].item() == pytest.approx(1 - 0.25 / 2)


def test_moepp_gating_residual_threads_through_layers():
    torch.manual_seed(2)
    cfg = MoEConfig(router="moepp", num_experts=4, top_k=2, d_ff=8)
    first, second = MoE(8, cfg), MoE(8, cfg)
    x = torch.randn(1, 6, 8)
    h, aux1 = first(x)
    y, aux2 = second(h, prev_router_logits=aux1.router_logits)
    assert aux1.router_logits.shape == (1, 6, cfg.total_experts)
    y.sum().backward()
    assert second.router.residual_weight.grad.abs().sum() > 0
    assert first.router.weight.grad.abs().sum() > 0  # through the residual into the first router
    with pytest.raises(ValueError, match="prev_router_logits"):
        second(h, prev_router_logits=aux1.router_logits[..., :3])


def test_chunk_level_sparsity_on_constructed_patterns():
    experts, seq = 8, 64
    # Token t uses expert (t // 4) % 8: each run of 4 tokens shares one expert.
    used = F.one_hot((torch.arange(seq) // 4) % experts, experts).bool()[None]
    expected = [1 - 1 / 8, 1 - 1 / 8, 1 - 2 / 8, 1 - 4 / 8, 1 - 8 / 8, 1 - 8 / 8]
    torch.testing.assert_close(chunk_level_sparsity(used), torch.tensor(expected))
    stats = routing_stats(used, torch.full((seq, experts), 1 / experts))
    assert stats["tls"].item() == pytest.approx(1 - 1 / 8)
    assert stats["router_entropy"].item() == pytest.approx(math.log(8))
    # Partial trailing chunk: 5 tokens, chunk 4 -> chunks [0..3] (1 expert) and [4] (1 expert).
    torch.testing.assert_close(chunk_level_sparsity(used[:, :5])[1], torch.tensor(1 - 1 / 8))


def test_chunk_level_sparsity_matches_chunk_by_chunk_count():
    """Batch of 2 sequences of 70 tokens (partial trailing chunks at every size but 2): CLS against
    a plain loop over the chunks of each sequence."""
    g = torch.Generator().manual_seed(4)
    used = torch.rand(2, 70, 5, generator=g) < torch.tensor([0.02, 0.3])[:, None, None]
    expected = []
    for size in CLS_CHUNK_SIZES:
        chunks = [used[b, start:start + size].any(0) for b in range(2) for start in range(0, 70, size)]
        expected.append(1 - torch.stack(chunks).float().mean())
    torch.testing.assert_close(chunk_level_sparsity(used), torch.stack(expected))


def test_layer_reports_cls_of_its_routing():
    experts = 8
    layer = top1_by_basis_direction(experts)
    x = basis_tokens(((torch.arange(64) // 8) % experts).tolist(), experts)[None]  # 8-token runs per expert
    _, aux = layer(x)
    assert [aux.stats[f"cls{c}"].item() for c in CLS_CHUNK_SIZES] == pytest.approx(
        [1 - 1 / 8, 1 - 1 / 8, 1 - 1 / 8, 1 - 2 / 8, 1 - 4 / 8, 0.0])
    torch.testing.assert_close(aux.expert_load, torch.full((experts,), 1 / 8))


def test_capacity_factor_drops_later_tokens():
    cfg = MoEConfig(router="topk", num_experts=4, top_k=1, d_ff=8, capacity_factor=1.0)
    layer = MoE(4, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    x = basis_tokens([0] * 6 + [1, 2], 4)[None]  # capacity = ceil(8 * 1 / 4) = 2 per expert
    y, aux = layer(x)
    dropless = MoE(4, MoEConfig(router="topk", num_experts=4, top_k=1, d_ff=8))
    dropless.load_state_dict(layer.state_dict())
    y_ref, _ = dropless(x)
    kept = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(y[0, kept], y_ref[0, kept])
    assert torch.equal(y[0, ~kept], torch.zeros(4, 4))
    assert aux.stats["dropped_fraction"].item() == pytest.approx(4 / 8)
    torch.testing.assert_close(aux.expert_load, torch.tensor([6, 1, 1, 0]) / 8)  # demand, before drops


@pytest.mark.parametrize("tokens, ffn, zero, copy, constant, tau, gamma, top_k", [
    (100, 8, 1, 1, 2, 0.75, 1.0, 2),
    (4096, 16, 1, 1, 2, 0.75, 1.25, 2),
    (333, 32, 1, 1, 6, 0.1, 1.0, 2),
    (50, 4, 2, 0, 1, 0.5, 2.0, 1),
])
def test_moepp_capacities_are_eq_8(tokens, ffn, zero, copy, constant, tau, gamma, top_k):
    """MoE++ eq. 8 (arXiv:2410.07348): C_FFN = gamma tau T / (tau N_FFN + N_ZC), C_ZC = gamma T / (tau N_FFN + N_ZC),
    T counting the T * k routed slots, rounded up."""
    cfg = MoEConfig(router="moepp", num_experts=ffn, top_k=top_k, num_zero_experts=zero, num_copy_experts=copy,
                    num_constant_experts=constant, tau=tau, capacity_factor=gamma)
    slots, zc = tokens * top_k, zero + copy + constant
    assert cfg.expert_capacity(tokens) == (math.ceil(gamma * tau * slots / (tau * ffn + zc)),
                                           math.ceil(gamma * slots / (tau * ffn + zc)))


def test_moepp_capacity_hand_case_and_reduction_to_top_k():
    cfg = MoEConfig(router="moepp", num_experts=8, top_k=2, tau=0.75, capacity_factor=1.0)  # 1 zero, 1 copy, 2 constant
    assert cfg.expert_capacity(100) == (15, 20)  # 200 slots / (0.75 * 8 + 4) = 20; 8 * 15 + 4 * 20 = 200
    no_zc = MoEConfig(router="moepp", num_experts=8, top_k=2, tau=1.0, capacity_factor=1.25, num_zero_experts=0,
                      num_copy_experts=0, num_constant_experts=0)
    top_k = MoEConfig(router="topk", num_experts=8, top_k=2, capacity_factor=1.25)
    assert no_zc.expert_capacity(100)[0] == top_k.expert_capacity(100)[0] == math.ceil(1.25 * 200 / 8)


def test_moepp_capacity_drops_ffn_and_zero_computation_slots_first_come_first_served():
    """Top-1 over basis tokens, FFN experts 0, 1; zero 2; copy 3; constant 4. T = 8, tau = 0.5, gamma = 1:
    C_ZC = ceil(8 / (0.5 * 2 + 3)) = 2, C_FFN = ceil(0.5 * 2) = 1."""
    common = dict(router="moepp", num_experts=2, top_k=1, d_ff=8, num_zero_experts=1, num_copy_experts=1,
                  num_constant_experts=1, tau=0.5, gating_residual=False)
    layer, dropless = MoE(5, MoEConfig(**common, capacity_factor=1.0)), MoE(5, MoEConfig(**common))
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(5))
    dropless.load_state_dict(layer.state_dict())
    assert layer.config.expert_capacity(8) == (1, 2)
    expert_of_token = [3, 3, 3, 4, 4, 4, 0, 0]  # copy x3, constant x3, FFN expert 0 x2
    x = basis_tokens(expert_of_token, 5)[None] * torch.linspace(1.0, 2.0, 8)[None, :, None]
    y, aux = layer(x)
    y_ref, aux_ref = dropless(x)
    kept = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)  # the third copy, constant and second FFN slot drop
    torch.testing.assert_close(y[0, kept], y_ref[0, kept])
    assert torch.equal(y[0, ~kept], torch.zeros(3, 5))  # no copy of x, no constant vector, no FFN output
    assert aux.stats["dropped_fraction"].item() == pytest.approx(1 / 2)
    assert aux.stats["zc_dropped_fraction"].item() == pytest.approx(2 / 6)
    assert aux_ref.stats["dropped_fraction"].item() == aux_ref.stats["zc_dropped_fraction"].item() == 0.0
    torch.testing.assert_close(aux.expert_load, torch.tensor([2 / 8, 0.0]))  # demand, before drops
    assert aux.stats["ffn_experts_per_token"].item() == pytest.approx(1 / 8)   # computed, after drops


def test_expert_activation_defaults_per_router():
    """BlockFFN's experts are non-gated SiLU FFNs (the reference's default); top-k and MoE++ keep SwiGLU."""
    assert MoEConfig(router="blockffn").activation == "silu"
    assert MoEConfig(router="topk").activation == MoEConfig(router="moepp").activation == "swiglu"
    assert MoEConfig(router="blockffn", activation="swiglu").activation == "swiglu"
    layer = MoE(4, MoEConfig(router="blockffn", num_experts=2, d_ff=8))
    assert layer.experts.w_in.shape == (2, 8, 4)  # no gate half


def test_load_summary():
    summary = load_summary(torch.tensor([0.5, 0.25, 0.25, 0.0]))
    assert summary["load_max"].item() == 0.5 and summary["load_min"].item() == 0.0
    assert summary["load_cv"].item() == pytest.approx(math.sqrt((0.25**2 + 0.25**2) / 4) / 0.25)
    assert load_summary(torch.full((4,), 0.5))["load_cv"].item() == 0.0
    assert load_summary(torch.zeros(4))["load_cv"].item() == 0.0


def test_blockffn_token_with_no_active_expert_gets_zero():
    cfg = MoEConfig(router="blockffn", num_experts=4, d_ff=8)
    layer = MoE(4, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[[-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]])
    y, aux = layer(x)
    assert torch.equal(y[0, 0], torch.zeros(4))
    assert aux.stats["ffn_experts_per_token"].item() == 1.0  # (0 + 2) / 2
    assert set(aux.losses) == {"activation_locality", "chunk_sparsity"}
    torch.testing.assert_close(aux.loss, aux.losses["activation_locality"] + aux.losses["chunk_sparsity"])


def test_blockffn_without_any_active_expert():
    layer = MoE(4, MoEConfig(router="blockffn", num_experts=4, d_ff=8))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    x = -torch.rand(1, 3, 4).add(0.1).requires_grad_()  # every router score < 0
    y, aux = layer(x)
    assert torch.equal(y, torch.zeros(1, 3, 4))
    assert aux.stats["tls"].item() == 1.0 and aux.stats["cls64"].item() == 1.0
    (y.sum() + aux.loss).backward()
    assert torch.equal(layer.experts.w_in.grad, torch.zeros_like(layer.experts.w_in))


def test_blockffn_expert_with_zero_scale_still_runs_and_learns_its_scale():
    torch.manual_seed(3)
    layer = MoE(12, CONFIGS["blockffn-silu"])
    with torch.no_grad():
        layer.router.norm_weight[2] = 0.0
    x = torch.randn(2, 9, 12)
    y, aux = layer(x)
    assert aux.expert_load[2] > 0  # computed: its ReLU output is non-zero for some tokens
    assert relative_error(y, token_loop_reference(layer, x)) < 1e-5
    (y * torch.randn_like(y)).sum().backward()
    assert layer.router.norm_weight.grad[2] != 0


def test_aux_free_bias_update_through_layer():
    cfg = MoEConfig(router="topk", num_experts=4, top_k=1, d_ff=8, bias_update_rate=0.01, score_func="sigmoid")
    layer = MoE(4, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    layer(basis_tokens([0, 0, 0, 1], 4)[None])
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.0, 0.01, 0.01]))
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoE(4, MoEConfig(num_experts=4)).update_expert_bias()


@pytest.mark.parametrize("kwargs, field", [
    ({"top_k": 9, "num_experts": 8}, "top_k"),
    ({"router": "switch"}, "router"),
    ({"router": "moepp", "tau": -0.5}, "tau"),
    ({"activation": "tanh"}, "activation"),
    ({"router": "blockffn", "capacity_factor": 1.25}, "capacity_factor"),
    ({"num_experts": 0}, "num_experts"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"router": "moepp", "bias_update_rate": 0.001}, "bias_update_rate"),
    ({"router": "moepp", "tau": 0.0, "capacity_factor": 1.0}, "tau"),
    ({"load_balance_coef": float("nan")}, "load_balance_coef"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoEConfig(**kwargs)


def test_moepp_top_k_may_use_zero_computation_experts():
    MoEConfig(router="moepp", num_experts=2, top_k=4, num_zero_experts=1, num_copy_experts=1, num_constant_experts=0)
    with pytest.raises(ValueError, match="MoEConfig.top_k"):
        MoEConfig(router="moepp", num_experts=2, top_k=5, num_zero_experts=1, num_copy_experts=1,
                  num_constant_experts=0)


def test_input_shape_errors():
    layer = MoE(8, MoEConfig(num_experts=4, d_ff=8))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="batch, seq, d_model"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="d_model must be"):
        MoE(0, MoEConfig())


def test_moepp_slot_fractions_count_token_expert_slots():
    """Top-2 over 2 FFN + 2 zero-computation experts: a token may send one slot to each kind, so the
    token share that touches a kind (the *_fraction) and the slot share (*_slot_fraction) differ."""
    cfg = MoEConfig(router="moepp", num_experts=2, top_k=2, d_ff=8, num_zero_experts=1, num_copy_experts=1,
                    num_constant_experts=0, gating_residual=False)
    layer = MoE(4, cfg)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    # each token is the sum of two basis vectors: its two experts; experts 2 = zero, 3 = copy
    x = (basis_tokens([0, 2, 3, 0], 4) + basis_tokens([1, 3, 1, 2], 4))[None]
    _, aux = layer(x)
    assert aux.stats["zero_fraction"].item() == 0.5 and aux.stats["zero_slot_fraction"].item() == 0.25
    assert aux.stats["copy_fraction"].item() == 0.5 and aux.stats["copy_slot_fraction"].item() == 0.25
