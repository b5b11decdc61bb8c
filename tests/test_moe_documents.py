"""Packed documents (`MoE(x, doc_ids=...)`): BlockFFN's locality and chunk losses and CLS against a plain
loop over the documents, the same results as before when every sequence is one document, and the
checks of doc_ids. (The fused CUDA kernels with documents: tests/test_moe_blockffn_fused.py.)

Tolerances: fp32 values and gradients 1e-5 relative to the largest reference value; with one
document per sequence the document path sums in another order, 1e-6 relative.
"""
import pytest
import torch
import torch.nn.functional as F
from moe_cases import top1_by_basis_direction

from sparta.moe import CLS_CHUNK_SIZES, MoE, MoEConfig
from sparta.moe.losses import activation_locality_loss, chunk_sparsity_loss, document_positions
from sparta.moe.metrics import chunk_level_sparsity, routing_stats

# Row 0: documents of 1, 1, 3, 65, 70 and 10 tokens (ids jump by more than 1 at one start); row 1: one document.
DOC_IDS = torch.stack([
    torch.repeat_interleave(torch.tensor([0, 1, 2, 5, 6, 7]), torch.tensor([1, 1, 3, 65, 70, 10])),
    torch.full((150,), 7),
])


def spans(doc_ids):
    """(row, start, end) of every document, read off the ids one token at a time."""
    found = []
    for b, row in enumerate(doc_ids.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1]:
                found.append((b, start, t))
                start = t
    return found


def locality_by_document(raw, sharpness, documents):
    terms = [F.binary_cross_entropy_with_logits(sharpness * raw[b, t - 1], torch.sigmoid(sharpness * raw[b, t]),
                                                reduction="none")
             for b, start, end in documents for t in range(start + 1, end)]
    return torch.stack(terms).mean()


def chunk_loss_by_document(probs, chunk_size, documents):
    unused = [torch.prod(1 - probs[b, c:min(c + chunk_size, end)] + 1e-5, dim=0)
              for b, start, end in documents for c in range(start, end, chunk_size)]
    return 1 - torch.stack(unused).mean()


def cls_by_document(used, documents):
    return torch.stack([1 - torch.stack([used[b, c:min(c + size, end)].any(0)
                                         for b, start, end in documents for c in range(start, end, size)]).float().mean()
                        for size in CLS_CHUNK_SIZES])


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def test_document_positions():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 4, 4], [3, 3, 3, 3, 3, 3, 3]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    assert document_positions(doc_ids).dtype == torch.int32


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_losses_and_cls_match_a_loop_over_documents(chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    experts = 6
    doc_pos = document_positions(DOC_IDS)
    documents = spans(DOC_IDS)
    raw = (0.05 * torch.randn(*DOC_IDS.shape, experts, generator=g)).requires_grad_()
    probs = torch.rand(*DOC_IDS.shape, experts, generator=g).div(experts).requires_grad_()
    for loss, reference in (
        (activation_locality_loss(raw, 100.0, doc_pos), locality_by_document(raw, 100.0, documents)),
        (chunk_sparsity_loss(probs, chunk_size, doc_pos), chunk_loss_by_document(probs, chunk_size, documents)),
    ):
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        for leaf in (raw, probs):
            grad, = torch.autograd.grad(loss, leaf, retain_graph=True, allow_unused=True)
            grad_ref, = torch.autograd.grad(reference, leaf, retain_graph=True, allow_unused=True)
            if grad_ref is None:
                assert grad is None or not grad.any()
            else:
                assert relative_error(grad, grad_ref) < 1e-5
    used = torch.rand(*DOC_IDS.shape, experts, generator=g) < 0.1
    torch.testing.assert_close(chunk_level_sparsity(used, doc_pos), cls_by_document(used, documents), rtol=0, atol=1e-6)


def test_one_document_per_sequence_is_the_sequence():
    g = torch.Generator().manual_seed(1)
    raw = 0.05 * torch.randn(3, 70, 5, generator=g)
    probs = torch.rand(3, 70, 5, generator=g) / 5
    used = torch.rand(3, 70, 5, generator=g) < 0.2
    doc_pos = document_positions(torch.arange(3)[:, None].expand(3, 70))
    assert activation_locality_loss(raw, 100.0, doc_pos).item() == pytest.approx(
        activation_locality_loss(raw, 100.0).item(), rel=1e-6)
    assert chunk_sparsity_loss(probs, 8, doc_pos).item() == pytest.approx(chunk_sparsity_loss(probs, 8).item(), rel=1e-6)
    torch.testing.assert_close(chunk_level_sparsity(used, doc_pos), chunk_level_sparsity(used), rtol=0, atol=1e-6)


def test_blockffn_layer_with_documents():
    """The layer's losses and CLS with doc_ids against the loops over documents, from its own router
    outputs; with one document per sequence, the same as without doc_ids."""
    torch.manual_seed(0)
    cfg = MoEConfig(router="blockffn", num_experts=6, d_ff=8, chunk_size=16, locality_coef=0.5, chunk_sparsity_coef=0.25)
    layer = MoE(8, cfg)
    x = torch.randn(*DOC_IDS.shape, 8)
    _, aux = layer(x, doc_ids=DOC_IDS)
    routing = layer.router(x.reshape(-1, 8), DOC_IDS.shape)
    raw, probs = routing.logits.view(*DOC_IDS.shape, -1), routing.probs.view(*DOC_IDS.shape, -1)
    documents = spans(DOC_IDS)
    assert aux.losses["activation_locality"].item() == pytest.approx(
        0.5 * locality_by_document(raw, cfg.locality_sharpness, documents).item(), rel=1e-5)
    assert aux.losses["chunk_sparsity"].item() == pytest.approx(
        0.25 * chunk_loss_by_document(probs, 16, documents).item(), rel=1e-5)
    cls = torch.stack([aux.stats[f"cls{size}"] for size in CLS_CHUNK_SIZES])
    torch.testing.assert_close(cls, cls_by_document(routing.active.view(*DOC_IDS.shape, -1), documents), rtol=0, atol=1e-6)

    y_none, aux_none = layer(x)
    y_one, aux_one = layer(x, doc_ids=torch.zeros(DOC_IDS.shape, dtype=torch.long))
    torch.testing.assert_close(y_one, y_none, rtol=0, atol=0)
    for key in aux_none.losses:
        assert aux_one.losses[key].item() == pytest.approx(aux_none.losses[key].item(), rel=1e-6), key
    for key in aux_none.stats:
        assert aux_one.stats[key].item() == pytest.approx(aux_none.stats[key].item(), abs=1e-6), key


def test_topk_cls_with_documents():
    """Top-1 over basis tokens: every token's expert is known, so CLS is the loop's over that mask."""
    experts = 4
    layer = top1_by_basis_direction(experts)
    expert_of_token = (torch.arange(150) // 3) % experts
    x = F.one_hot(expert_of_token, experts).float()[None].expand(2, -1, -1)
    _, aux = layer(x, doc_ids=DOC_IDS)
    used = F.one_hot(expert_of_token, experts).bool()[None].expand(2, -1, -1)
    cls = torch.stack([aux.stats[f"cls{size}"] for size in CLS_CHUNK_SIZES])
    torch.testing.assert_close(cls, cls_by_document(used, spans(DOC_IDS)), rtol=0, atol=1e-6)
    stats = routing_stats(used, torch.full((300, experts), 1 / experts))
    assert aux.stats["cls8"].item() != pytest.approx(stats["cls8"].item())  # the documents moved the chunks


@pytest.mark.parametrize("doc_ids, what", [
    (torch.zeros(2, 5, dtype=torch.long), "shape"),
    (torch.zeros(2, 6), "float"),
    (torch.zeros(2, 6, dtype=torch.bool), "bool"),
])
def test_bad_doc_ids_name_the_argument(doc_ids, what):
    layer = MoE(4, MoEConfig(router="blockffn", num_experts=4, d_ff=8))
    with pytest.raises(ValueError, match="doc_ids must be an integer"):
        layer(torch.randn(2, 6, 4), doc_ids=doc_ids)
