"""Router formulas and auxiliary losses against small hand-computed cases (values and gradients)."""
import math

import pytest
import torch

from sparta.moe import MoEConfig
from sparta.moe.losses import (
    activation_locality_loss,
    chunk_sparsity_loss,
    heterogeneous_load_balance_loss,
    router_z_loss,
    switch_load_balance_loss,
)
from sparta.moe.routers import BlockFFNRouter, MoEPPRouter, TopKRouter


def router_with_identity_weight(cls, config, scale=1.0):
    """d_model = number of router experts and W = scale * I, so the logits are scale * x."""
    router = cls(config.total_experts, config)
    with torch.no_grad():
        router.weight.copy_(scale * torch.eye(config.total_experts))
    return router


def test_topk_softmax_selects_and_renormalises():
    cfg = MoEConfig(router="topk", num_experts=4, top_k=2)
    router = router_with_identity_weight(TopKRouter, cfg)
    routing = router(torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 3.5]]), (1, 2))
    assert routing.slot_expert.tolist() == [[0, 1], [3, 1]]
    e = math.e
    expected = [[e**2 / (e**2 + e), e / (e**2 + e)], [1 / (1 + e**-0.5), e**-0.5 / (1 + e**-0.5)]]
    torch.testing.assert_close(routing.slot_weight, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    probs_row0 = torch.tensor([e**2, e, 1.0, 1 / e]) / (e**2 + e + 1 + 1 / e)
    torch.testing.assert_close(routing.probs[0], probs_row0)


def test_topk_without_renormalisation_keeps_softmax_weights():
    cfg = MoEConfig(router="topk", num_experts=3, top_k=1, normalize_topk=False)
    routing = router_with_identity_weight(TopKRouter, cfg)(torch.tensor([[1.0, 0.0, 0.0]]), (1, 1))
    assert routing.slot_expert.tolist() == [[0]]
    assert routing.slot_weight.item() == pytest.approx(math.e / (math.e + 2))


def test_sigmoid_bias_changes_selection_not_weights():
    cfg = MoEConfig(router="topk", num_experts=3, top_k=1, score_func="sigmoid", bias_update_rate=0.1)
    router = router_with_identity_weight(TopKRouter, cfg)
    x = torch.tensor([[1.0, 0.5, 0.0]])
    assert router(x, (1, 1)).slot_expert.item() == 0
    router.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    routing = router(x, (1, 1))
    assert routing.slot_expert.item() == 1
    assert routing.slot_weight.item() == pytest.approx(1.0)  # renormalised over the one selected expert
    unnormalised = MoEConfig(router="topk", num_experts=3, top_k=1, score_func="sigmoid", normalize_topk=False)
    assert router_with_identity_weight(TopKRouter, unnormalised)(x, (1, 1)).slot_weight.item() == pytest.approx(
        1 / (1 + math.exp(-1.0)))


def test_bias_update_moves_towards_balance():
    cfg = MoEConfig(router="topk", num_experts=3, top_k=1, bias_update_rate=0.1)
    router = router_with_identity_weight(TopKRouter, cfg)
    router.train()
    router(torch.tensor([[5.0, 0.0, 0.0]] * 3 + [[0.0, 5.0, 0.0]]), (1, 4))  # loads 3, 1, 0 (mean 4/3)
    router.update_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    assert router.load_since_update.sum() == 0


def test_switch_load_balance_value_and_gradient():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]], requires_grad=True)
    selected = torch.tensor([[0], [0]])
    loss = switch_load_balance_loss(probs, selected)
    assert loss.item() == pytest.approx(2 * (1.0 * 0.7 + 0.0 * 0.3))  # f = [1, 0], P = [0.7, 0.3]
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # E * f_i / T
    uniform = torch.full((4, 4), 0.25)
    assert switch_load_balance_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])).item() == pytest.approx(1.0)


def test_router_z_loss_value_and_gradient():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = router_z_loss(logits)
    lse = torch.tensor([math.log(2), 1 + math.log(2)])
    assert loss.item() == pytest.approx((lse**2).mean().item())
    loss.backward()
    torch.testing.assert_close(logits.grad, (2 * lse / 2)[:, None] * 0.5 * torch.ones(2, 2))


def test_heterogeneous_load_balance_value_and_gradient():
    # 2 FFN experts + 1 zero-computation expert, 2 tokens, top-1.
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]], requires_grad=True)
    selected = torch.tensor([[0], [2]])
    tau = 0.75
    loss = heterogeneous_load_balance_loss(probs, selected, num_ffn_experts=2, tau=tau)
    f = [0.5, 0.0, 0.5]
    P = [0.3, 0.25, 0.45]
    assert loss.item() == pytest.approx(1 * f[0] * P[0] + 1 * f[1] * P[1] + tau * f[2] * P[2])
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[0.25, 0.0, 0.1875]] * 2))  # eta_i f_i / T
    # tau = 1 treats every expert alike: with top-1, the Switch loss without its factor E (eq. 7 has none).
    untyped = heterogeneous_load_balance_loss(probs, selected, num_ffn_experts=2, tau=1.0)
    torch.testing.assert_close(untyped, switch_load_balance_loss(probs, selected) / 3)


def test_activation_locality_value_and_gradient():
    alpha = 2.0
    a, b = 0.3, -0.4
    raw = torch.tensor([[[a], [b]]], requires_grad=True)
    loss = activation_locality_loss(raw, alpha)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    q = sig(alpha * b)
    assert loss.item() == pytest.approx(-(q * math.log(sig(alpha * a)) + (1 - q) * math.log(1 - sig(alpha * a))))
    loss.backward()
    grad_a = alpha * (sig(alpha * a) - q)
    grad_b = -alpha * q * (1 - q) * alpha * a  # target side: d/dq of the BCE is -(alpha * a)
    torch.testing.assert_close(raw.grad, torch.tensor([[[grad_a], [grad_b]]]))
    assert activation_locality_loss(torch.zeros(1, 1, 3), alpha).item() == 0.0


def test_chunk_sparsity_value_and_gradient():
    p = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]], requires_grad=True)  # one chunk of 2 tokens, 2 experts
    loss = chunk_sparsity_loss(p, chunk_size=2)
    eps = 1e-5
    keep = [(1 - 0.5 + eps) * (1 - 0.2 + eps), (1 - 0.5 + eps) * (1 - 0.8 + eps)]
    assert loss.item() == pytest.approx(1 - sum(keep) / 2, rel=1e-6)
    loss.backward()
    expected = [[keep[0] / (1 - 0.5 + eps) / 2, keep[1] / (1 - 0.5 + eps) / 2],
                [keep[0] / (1 - 0.2 + eps) / 2, keep[1] / (1 - 0.8 + eps) / 2]]
    torch.testing.assert_close(p.grad, torch.tensor([expected]))


def test_chunk_sparsity_partial_chunk_is_a_shorter_chunk():
    p = torch.rand(1, 3, 4) / 4
    whole = chunk_sparsity_loss(p, chunk_size=2)
    eps = 1e-5
    keep_first = (1 - p[0, 0] + eps) * (1 - p[0, 1] + eps)
    keep_last = 1 - p[0, 2] + eps
    torch.testing.assert_close(whole, 1 - torch.cat([keep_first, keep_last]).mean())


def test_blockffn_router_relu_rmsnorm_and_variable_experts():
    cfg = MoEConfig(router="blockffn", num_experts=4)
    router = router_with_identity_weight(BlockFFNRouter, cfg)
    with torch.no_grad():
        router.norm_weight.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
    x = torch.tensor([[3.0, 4.0, -1.0, 0.0], [-1.0, -2.0, -3.0, -4.0]])
    routing = router(x, (1, 2))
    rms = math.sqrt((9 + 16) / 4 + cfg.router_norm_eps)
    torch.testing.assert_close(routing.slot_weight[0], torch.tensor([3 / rms, 2 * 4 / rms, 0.0, 0.0]))
    assert routing.slot_expert.tolist() == [[0, 1, -1, -1], [-1, -1, -1, -1]]
    torch.testing.assert_close(routing.probs[0], torch.tensor([3 / rms, 4 / rms, 0, 0]) / (7 / rms + 1e-5))
    assert torch.equal(routing.slot_weight[1], torch.zeros(4))
    torch.testing.assert_close(routing.logits, x)


def test_blockffn_router_losses_use_their_coefficients():
    cfg = MoEConfig(router="blockffn", num_experts=4, locality_coef=0.5, chunk_sparsity_coef=0.25, chunk_size=2)
    router = router_with_identity_weight(BlockFFNRouter, cfg)
    x = torch.randn(6, 4)
    routing = router(x, (2, 3))
    torch.testing.assert_close(routing.losses["activation_locality"],
                               0.5 * activation_locality_loss(x.view(2, 3, 4), cfg.locality_sharpness))
    torch.testing.assert_close(routing.losses["chunk_sparsity"], 0.25 * chunk_sparsity_loss(routing.probs.view(2, 3, 4), 2))


def test_moepp_router_zero_expert_gate_and_renormalisation():
    # 2 FFN experts, then zero (id 2), copy (id 3), constant (id 4).
    cfg = MoEConfig(router="moepp", num_experts=2, top_k=2, num_zero_experts=1, num_copy_experts=1,
                    num_constant_experts=1, gating_residual=False)
    router = router_with_identity_weight(MoEPPRouter, cfg)
    routing = router(torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 1.0]]), (1, 2))
    assert routing.slot_expert.tolist() == [[0, 2], [3, 4]]
    torch.testing.assert_close(routing.slot_weight[0], torch.tensor([1.0, 0.0]))  # zero expert's gate removed
    e = math.e
    torch.testing.assert_close(routing.slot_weight[1], torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_moepp_gating_residual_adds_mapped_previous_logits():
    cfg = MoEConfig(router="moepp", num_experts=2, top_k=1, num_zero_experts=1, num_copy_experts=0,
                    num_constant_experts=0)
    router = router_with_identity_weight(MoEPPRouter, cfg)
    with torch.no_grad():
        router.residual_weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.5, 0.0]])
    prev = torch.tensor([[1.0, 0.0, 0.0]])
    assert router(x, (1, 1)).slot_expert.item() == 0
    routing = router(x, (1, 1), prev_logits=prev)
    torch.testing.assert_close(routing.logits, torch.tensor([[1.0, 0.5, 3.0]]))
    assert routing.slot_expert.item() == 2
