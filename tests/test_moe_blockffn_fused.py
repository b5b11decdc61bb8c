"""The fused BlockFFN kernels (router epilogue, routing statistics) against the torch formulas.

They run on CPU tensors under Triton's interpreter (tests/conftest.py turns it on where there is no
GPU; tests/gpu/test_moe_gpu.py runs them on CUDA at T = 16k), without and with packed documents
(`doc_pos`; the torch formulas with documents are checked against a loop over the documents in
tests/test_moe_documents.py). fp32 throughout; tolerance 1e-5 relative to the largest reference
value (max abs error / max abs reference), 1e-6 absolute for the 0-dim losses and statistics.
"""
import pytest
import torch

from sparta.kernels.blockffn_router import blockffn_router_epilogue
from sparta.kernels.routing_stats import routing_stats_fused
from sparta.moe.losses import document_positions
from sparta.moe.metrics import CLS_CHUNK_SIZES, routing_stats
from sparta.moe.routers import blockffn_router_epilogue_torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU interpreter tests; tests/gpu/test_moe_gpu.py runs these kernels on CUDA")


def assert_close(actual, expected, what, tolerance=1e-5):
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-12
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def router_scores(batch, seq, experts, generator, rate=0.4):
    """Raw scores with about `rate` of them > 0, some exact zeros, in the range where sharpness 100
    makes the locality sigmoid neither flat nor saturated everywhere."""
    raw = torch.randn(batch * seq, experts, generator=generator) * 0.05 - 0.05 * 0.25 * (1 - 2 * rate)
    raw[::7, 0] = 0.0
    return raw


def random_documents(batch, seq, rate, generator):
    """doc_pos of sequences cut into documents: a token starts one with probability `rate`."""
    return document_positions((torch.rand(batch, seq, generator=generator) < rate).long().cumsum(1))


def fused_and_torch_epilogues(raw, norm_weight, batch_shape, options, generator):
    """Both epilogues' outputs and gradients (of the weights, probs and both losses) on the same inputs."""
    grads = [torch.randn(*raw.shape, generator=generator), torch.randn(*raw.shape, generator=generator)]
    loss_grads = [0.7, -1.3]
    results = []
    for epilogue in (blockffn_router_epilogue, blockffn_router_epilogue_torch):
        raw_in, g_in = raw.clone().requires_grad_(), norm_weight.clone().requires_grad_()
        weights, probs, slot_expert, active, locality, chunk = epilogue(raw_in, g_in, batch_shape, **options)
        objective = (weights * grads[0]).sum() + (probs * grads[1]).sum() + loss_grads[0] * locality + loss_grads[1] * chunk
        objective.backward()
        results.append(dict(weights=weights, probs=probs, slot_expert=slot_expert, active=active, locality=locality,
                            chunk=chunk, d_raw=raw_in.grad, d_g=g_in.grad))
    return results


def assert_epilogues_agree(fused, reference):
    assert torch.equal(fused["slot_expert"], reference["slot_expert"])
    assert torch.equal(fused["active"], reference["active"])
    for key in ("weights", "probs", "d_raw", "d_g"):
        assert_close(fused[key], reference[key], key)
    for key in ("locality", "chunk"):
        assert fused[key].item() == pytest.approx(reference[key].item(), rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("batch, seq, experts, chunk_size", [
    (2, 40, 8, 8),     # several chunks per program, whole chunks
    (1, 37, 6, 64),    # one partial chunk, experts not a power of two
    (3, 10, 5, 3),     # chunk size not a power of two, trailing partial chunks
    (1, 1, 4, 2),      # one token: no locality pair
    (1, 300, 16, 256),  # a chunk longer than one step of the loop over its rows
])
def test_router_epilogue_matches_torch(batch, seq, experts, chunk_size):
    g = torch.Generator().manual_seed(seq * experts)
    raw = router_scores(batch, seq, experts, g)
    norm_weight = 0.5 + torch.rand(experts, generator=g)
    options = dict(eps=1e-5, sharpness=100.0, chunk_size=chunk_size, locality_coef=2e-3, chunk_sparsity_coef=5e-2)
    assert_epilogues_agree(*fused_and_torch_epilogues(raw, norm_weight, (batch, seq), options, g))


@pytest.mark.parametrize("batch, seq, experts, chunk_size, rate", [
    (2, 40, 8, 8, 0.1),     # documents shorter and longer than a chunk, several chunk starts per program
    (1, 37, 6, 64, 0.05),   # partial chunks only
    (3, 10, 5, 3, 0.3),     # chunk size not a power of two
    (2, 50, 8, 4, 0.9),     # mostly one-token documents: few locality pairs, a chunk per token
    (1, 300, 16, 256, 0.01),  # a chunk longer than one step of the loop over its rows
])
def test_router_epilogue_with_documents_matches_torch(batch, seq, experts, chunk_size, rate):
    g = torch.Generator().manual_seed(seq * experts + 1)
    raw = router_scores(batch, seq, experts, g)
    norm_weight = 0.5 + torch.rand(experts, generator=g)
    options = dict(eps=1e-5, sharpness=100.0, chunk_size=chunk_size, locality_coef=2e-3, chunk_sparsity_coef=5e-2,
                   doc_pos=random_documents(batch, seq, rate, g))
    assert_epilogues_agree(*fused_and_torch_epilogues(raw, norm_weight, (batch, seq), options, g))


def test_router_epilogue_with_one_token_documents_has_no_locality_pair():
    g = torch.Generator().manual_seed(3)
    raw = router_scores(2, 9, 4, g)
    options = dict(eps=1e-5, sharpness=100.0, chunk_size=4, locality_coef=1.0, chunk_sparsity_coef=1.0,
                   doc_pos=torch.zeros(2, 9, dtype=torch.int32))
    fused, reference = fused_and_torch_epilogues(raw, torch.ones(4), (2, 9), options, g)
    assert fused["locality"].item() == reference["locality"].item() == 0.0
    assert_epilogues_agree(fused, reference)


@pytest.mark.parametrize("documents", [False, True])
def test_router_epilogue_gradient_of_the_losses_alone(documents):
    """Only the losses backpropagate (weights and probs get no gradient): the backward's None paths."""
    g = torch.Generator().manual_seed(5)
    raw = router_scores(2, 33, 8, g)
    norm_weight = torch.ones(8)
    options = dict(eps=1e-5, sharpness=100.0, chunk_size=4, locality_coef=0.5, chunk_sparsity_coef=0.25,
                   doc_pos=random_documents(2, 33, 0.2, g) if documents else None)
    grads = []
    for epilogue in (blockffn_router_epilogue, blockffn_router_epilogue_torch):
        raw_in = raw.clone().requires_grad_()
        *_, locality, chunk = epilogue(raw_in, norm_weight, (2, 33), **options)
        (locality + chunk).backward()
        grads.append(raw_in.grad)
    assert_close(grads[0], grads[1], "d_raw")


def test_router_epilogue_rejects_bad_input():
    with pytest.raises(ValueError, match="raw must be fp32"):
        blockffn_router_epilogue(torch.zeros(6, 4, dtype=torch.float16), torch.ones(4), (2, 3), eps=1e-5,
                                 sharpness=1.0, chunk_size=2, locality_coef=1.0, chunk_sparsity_coef=1.0)
    with pytest.raises(ValueError, match="norm_weight"):
        blockffn_router_epilogue(torch.zeros(6, 4), torch.ones(3), (2, 3), eps=1e-5,
                                 sharpness=1.0, chunk_size=2, locality_coef=1.0, chunk_sparsity_coef=1.0)
    with pytest.raises(ValueError, match="doc_pos must be int32"):
        blockffn_router_epilogue(torch.zeros(6, 4), torch.ones(4), (2, 3), eps=1e-5, sharpness=1.0, chunk_size=2,
                                 locality_coef=1.0, chunk_sparsity_coef=1.0, doc_pos=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("batch, seq, experts, probs_experts, rate", [
    (2, 70, 5, 5, None), (1, 200, 8, 11, None), (3, 9, 16, 16, None),
    (2, 70, 5, 5, 0.05), (1, 200, 8, 11, 0.02), (3, 9, 16, 16, 0.3), (2, 130, 4, 4, 0.5),
])
def test_routing_stats_kernel_matches_torch(batch, seq, experts, probs_experts, rate):
    """Partial trailing chunks at every CLS size, a probs width other than E (MoE++), several sequences;
    rate: documents starting at that rate (None: one per sequence), down to mostly one-token ones."""
    g = torch.Generator().manual_seed(seq)
    rate_of_use = torch.rand(experts, generator=g) * 0.3
    used = torch.rand(batch, seq, experts, generator=g) < rate_of_use
    probs = torch.rand(batch * seq, probs_experts, generator=g)
    probs[::3, 0] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    doc_pos = None if rate is None else random_documents(batch, seq, rate, g)
    reference = routing_stats(used, probs, doc_pos)
    values = routing_stats_fused(used.transpose(0, 1).contiguous().transpose(0, 1), probs, len(CLS_CHUNK_SIZES), doc_pos)
    load, (tls, per_token, entropy), cls = values.split([experts, 3, len(CLS_CHUNK_SIZES)])
    torch.testing.assert_close(load, reference["expert_load"], rtol=0, atol=1e-6)
    torch.testing.assert_close(cls, torch.stack([reference[f"cls{size}"] for size in CLS_CHUNK_SIZES]), rtol=0, atol=1e-6)
    for name, value in (("tls", tls), ("ffn_experts_per_token", per_token), ("router_entropy", entropy)):
        assert value.item() == pytest.approx(reference[name].item(), abs=1e-6), name
