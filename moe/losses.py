"""Auxiliary router losses, unweighted (the routers multiply them by their `MoEConfig` coefficient).

All take fp32 router tensors; `selected` holds expert indices and carries no gradient.
"""
import torch
import torch.nn.functional as F


def _selection_counts(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    flat = selected.reshape(-1)
    return torch.zeros(num_experts, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def switch_load_balance_loss(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load balance `E * sum_i f_i * P_i`, 1.0 when routing is uniform.

    probs [T, E]: routing distribution per token; selected [T, k]: chosen experts.
    f_i = share of the T*k selections that went to expert i, P_i = mean routing probability of i.
    (Fedus et al. 2021, eq. 4; with top-k the selections are counted over all k slots, as in GShard.)
    """
    num_experts = probs.shape[-1]
    fraction = _selection_counts(selected, num_experts) / selected.numel()
    return num_experts * (fraction * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def heterogeneous_load_balance_loss(probs: torch.Tensor, selected: torch.Tensor, num_ffn_experts: int,
                                    tau: float) -> torch.Tensor:
    """MoE++ heterogeneous load balance `L_b = sum_i eta_i * f_i * P_i` (Jin et al. 2024, "MoE++",
    arXiv:2410.07348, sec. 3.3, eq. 7).

    Eq. 7: f_i = (1/T) sum_t 1(token x_t selects expert i), P_i = (1/T) sum_t Softmax(G(x_t))_i, over
    all N experts (the FFN experts followed by the zero-computation experts here); eta_i = 1 for an
    FFN expert and tau for a zero-computation expert, so tau < 1 lets the router send more tokens
    to the cheap experts. No factor N (unlike Switch's): with top-k, sum_i f_i = k. The training
    loss is L_ce + beta * L_b (eq. 9), beta = 0.01 (appendix B.2), and tau = 0.75 by default
    (sec. 4.3). (The reference repository SkyworkAI/MoE-plus-plus ships the model code only, no
    training loss.)
    """
    num_tokens, num_experts = probs.shape
    fraction = _selection_counts(selected, num_experts) / num_tokens
    eta = torch.ones(num_experts, device=probs.device)
    eta[num_ffn_experts:] = tau
    return (eta * fraction * probs.mean(0)).sum()


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] int32: each token's position inside its document (0 at its first token).

    doc_ids [batch, seq] integer: a token whose id differs from the previous token's starts a
    document, as does the first token of every sequence (so packed documents are cut where the id
    changes, e.g. the count of end-of-text tokens before each position). Computed on the device,
    with no host synchronisation; BlockFFN's losses and the CLS metric read it.
    """
    seq = doc_ids.shape[1]
    position = torch.arange(seq, device=doc_ids.device)
    starts = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=True)
    first = torch.where(starts, position, 0).cummax(dim=1).values
    return (position - first).to(torch.int32)


def activation_locality_loss(raw_scores: torch.Tensor, sharpness: float, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """BlockFFN activation-locality loss: neighbouring tokens should activate the same experts
    (Song et al. 2025, arXiv:2507.08771).

    raw_scores [B, S, E]: router scores before the ReLU. With A_t = sigmoid(alpha * s_t), a smooth
    "expert e is active" indicator, the loss is the binary cross entropy of A_{t-1} predicting
    A_t, averaged over the pairs (t-1, t) and experts; both sides carry gradient, as in the
    reference (thunlp/BlockFFN, pretrain/cpm/dragonfly/activation_context.py,
    `transfer_regularization`: `binary_cross_entropy_with_logits(left * steep, sigmoid(right *
    steep))`, steep = 100). doc_pos ([B, S], `document_positions`): only the pairs inside one
    document count, as the reference's `segment_shift_indices` (-1 at a segment start) select them.
    """
    if raw_scores.shape[1] < 2:
        return raw_scores.sum() * 0.0
    previous = sharpness * raw_scores[:, :-1]
    current = torch.sigmoid(sharpness * raw_scores[:, 1:])
    if doc_pos is None:
        return F.binary_cross_entropy_with_logits(previous, current)
    same_document = (doc_pos[:, 1:] > 0)[..., None]
    bce = F.binary_cross_entropy_with_logits(previous, current, reduction="none")
    pairs = same_document.sum() * raw_scores.shape[-1]
    return torch.where(same_document, bce, 0.0).sum() / pairs.clamp_min(1)


def chunk_ids(doc_pos: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks that restart at every document start: ([B*S] int64 chunk of each token, numbered in
    token order from 0; 0-dim number of chunks). A document of n tokens has ceil(n / chunk_size)
    chunks, its last one possibly partial. doc_pos [B, S]: `document_positions`."""
    starts = (doc_pos % chunk_size == 0).reshape(-1)
    return starts.cumsum(0) - 1, starts.sum()


def chunk_sparsity_loss(probs: torch.Tensor, chunk_size: int, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """BlockFFN chunk-sparsification loss: the probability that an expert is active in a chunk
    (Song et al. 2025, arXiv:2507.08771).

    probs [B, S, E]: normalised router scores p_{t,e} (sum to 1 over experts). For every chunk of
    `chunk_size` consecutive tokens and expert e, P(e used by the chunk) = 1 - prod_t (1 - p_{t,e});
    the loss is its mean over chunks and experts (thunlp/BlockFFN, activation_context.py,
    `chunk_regularization`: `1 - mean(exp(sum(log(1 - p + 1e-5))))`). A trailing partial chunk is
    padded with p = 1e-5, whose factor (1 - p + 1e-5) is exactly 1. doc_pos ([B, S],
    `document_positions`): the chunks restart at every document start (`chunk_ids`), so that no
    chunk spans two documents, as CLS is measured here (the reference cuts its chunks along the
    packed sequence and only masks padding out, `seq_mask`).
    """
    batch, seq, experts = probs.shape
    if doc_pos is None:
        pad = -seq % chunk_size
        if pad:
            probs = F.pad(probs, (0, 0, 0, pad), value=1e-5)
        log_unused = torch.log1p(1e-5 - probs).view(batch, -1, chunk_size, experts).sum(dim=2)
        return 1.0 - torch.exp(log_unused).mean()
    chunk, num_chunks = chunk_ids(doc_pos, chunk_size)
    tokens = batch * seq
    log_unused = probs.new_zeros(tokens, experts).index_add(0, chunk, torch.log1p(1e-5 - probs.reshape(tokens, experts)))
    is_chunk = (torch.arange(tokens, device=probs.device) < num_chunks)[:, None]
    return 1.0 - torch.where(is_chunk, torch.exp(log_unused), 0.0).sum() / (num_chunks * experts)
