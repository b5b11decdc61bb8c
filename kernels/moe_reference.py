"""Pure-torch references of the MoE kernels (`grouped_gemm.py`, `moe_permute.py`).

They define the math the Triton kernels must reproduce, run anywhere (CPU included) and are
differentiable through plain autograd. The MoE layer uses them on the CPU, where Triton needs the
interpreter; the tests compare the fast kernels with them.

Conventions shared with the kernels (the "routing plan" of `sparta.moe.dispatch`):
- a token `t` has `S` routing slots; `token_pos[t, j]` is the row of slot `j` in the expert-sorted
  buffer, or -1 when the slot uses no FFN expert (zero-computation expert, dropped, inactive);
  only the set of a token's rows matters, so a plan may reorder them (BlockFFN's lists them first);
- `row_token[r]` is the token that row `r` of the buffer came from, or -1 for a padding row: to
  avoid a host synchronisation the buffer may have more rows than routed slots, padding last;
- `offs[g]` is the cumulative end row of group (expert) `g`, int32, as `torch._grouped_mm` takes it;
  `offs[-1]` is the number of real rows.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "relu", "gelu", "silu")


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`out[rows of g] = x[rows of g] @ w[g]` for x [M, K], w [G, K, N]; rows >= offs[-1] give 0."""
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def grouped_mm_weight_grad_reference(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_mm_reference`: `dw[g] = x[rows of g]^T @ dy[rows of g]`
    ([G, K, N], zeros for an empty group)."""
    dw = x.new_zeros(offs.shape[0], x.shape[1], dy.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        dw[g] = x[start:end].t() @ dy[start:end]
        start = end
    return dw


def permute_reference(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows: `rows[r] = x[row_token[r]]`; padding rows (row_token -1) are 0."""
    rows = x.index_select(0, row_token.long().clamp(min=0))
    return torch.where((row_token >= 0)[:, None], rows, 0)


def unpermute_reference(rows: torch.Tensor, row_token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum every real row back into its token: `y[t] = sum of rows[r] with row_token[r] == t`.
    Padding rows (row_token -1) are masked out, whatever they hold."""
    real = torch.where((row_token >= 0)[:, None], rows.float(), 0)
    out = rows.new_zeros(num_tokens, rows.shape[-1], dtype=torch.float32)
    return out.index_add_(0, row_token.long().clamp(min=0), real).to(rows.dtype)


def activation_reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Expert activation in fp32; for "swiglu" `h` is `[gate | up]` along the last dim."""
    h = h.float()
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def weighted_activation_reference(h: torch.Tensor, row_weight: torch.Tensor, activation: str,
                                  num_rows: torch.Tensor | None = None) -> torch.Tensor:
    """`act(h[r]) * row_weight[r]`: the routing weight applied before the (linear) down projection.
    Rows at or past `num_rows` are padding: output 0, gradient 0, even if they hold NaN."""
    if num_rows is None:
        return (activation_reference(h, activation) * row_weight.float()[:, None]).to(h.dtype)
    real = (torch.arange(h.shape[0], device=h.device) < num_rows.reshape(()))[:, None]
    out = activation_reference(torch.where(real, h, 0), activation) * row_weight.float()[:, None]
    return torch.where(real, out, 0).to(h.dtype)


def moe_ffn_token_loop(
    x: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The naive definition of a routed FFN: for every token and slot, `weight * FFN_e(x_t)`.

    x [T, d]; slot_expert [T, S] (-1 = no FFN expert); slot_weight [T, S];
    w13 [E, H, d] (H = 2*d_ff for swiglu, d_ff otherwise); w2 [E, d, d_ff].
    """
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[-1], dtype=torch.float32)
        for j in range(slot_expert.shape[1]):
            e = int(slot_expert[t, j])
            if e < 0:
                continue
            h = x[t] @ w13[e].t()
            a = activation_reference(h[None], activation)[0].to(x.dtype)
            y = y + slot_weight[t, j].float() * (a @ w2[e].t()).float()
        rows.append(y)
    return torch.stack(rows).to(x.dtype)
