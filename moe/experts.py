"""Experts: grouped FFN experts, MoE++ zero-computation experts, shared (always-on) experts."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparta.kernels.grouped_gemm import grouped_mm
from sparta.kernels.moe_permute import weighted_activation
from sparta.kernels.moe_reference import activation_reference


def _input_width(d_ff: int, activation: str) -> int:
    return 2 * d_ff if activation == "swiglu" else d_ff


class GroupedExperts(nn.Module):
    """E FFN experts stored as one stacked weight per projection, run as two grouped GEMMs.

    w_in [E, H, d] (for swiglu H = 2*d_ff: rows [:d_ff] gate, [d_ff:] up, as MoE++'s `up_proj`),
    w_out [E, d, d_ff]. The input rows are sorted by expert (`offs`: cumulative end row per expert)
    and `row_weight` is each row's routing weight, applied to the hidden activation.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, _input_width(d_ff, activation), d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, rows: torch.Tensor, row_weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows past offs[-1] are padding: their output is unspecified and they get no gradient."""
        w_in = self.w_in.to(rows.dtype).transpose(1, 2)
        w_out = self.w_out.to(rows.dtype).transpose(1, 2)
        hidden = weighted_activation(grouped_mm(rows, w_in, offs), row_weight, self.activation, num_rows=offs[-1:])
        return grouped_mm(hidden, w_out, offs)


class ZeroComputationExperts(nn.Module):
    """MoE++ zero-computation experts (SkyworkAI/MoE-plus-plus, moe_plus_plus_layer.py):
    zero `E(x) = 0` (discard), copy `E(x) = x` (skip), constant `E(x) = a1 x + a2 v` with
    `[a1, a2] = softmax(W_c x)` and a trained vector v (replace). They are cheap enough to run on
    every token here, locally on every rank, so they never enter the grouped GEMM or the all-to-all.
    Expert ids: [N, N+zero) zero, then copy, then constant experts.
    """

    def __init__(self, d_model: int, num_ffn_experts: int, num_zero: int, num_copy: int, num_constant: int):
        super().__init__()
        self.first_copy = num_ffn_experts + num_zero
        self.first_constant = self.first_copy + num_copy
        self.num_constant = num_constant
        self.constant = nn.Parameter(torch.randn(num_constant, d_model))
        self.constant_gate = nn.Parameter(torch.empty(num_constant * 2, d_model))
        nn.init.normal_(self.constant_gate, std=0.02)

    def forward(self, x: torch.Tensor, slot_expert: torch.Tensor, slot_weight: torch.Tensor) -> torch.Tensor:
        """Sum over the slots routed to copy and constant experts of `weight * E(x)` ([T, d], x's dtype).

        Per token this is `c * x + sum_k m_k * v_k`: the mixing weights are fp32, the two
        [T, d] products are done in x's dtype (a few passes over [T, d] in all).
        """
        is_copy = (slot_expert >= self.first_copy) & (slot_expert < self.first_constant)
        x_weight = (slot_weight * is_copy).sum(-1)
        if not self.num_constant:
            return x_weight[:, None].to(x.dtype) * x
        constant_id = slot_expert - self.first_constant
        is_constant = constant_id >= 0
        constant_weight = torch.zeros(x.shape[0], self.num_constant + 1, device=x.device).scatter_add(
            1, torch.where(is_constant, constant_id, self.num_constant), slot_weight * is_constant)[:, :-1]
        # The mixing gate runs in the model dtype, as the reference's `ConstantExpert.wg`; softmax in fp32.
        mix = F.linear(x, self.constant_gate.to(x.dtype)).float().view(-1, self.num_constant, 2).softmax(-1)
        x_weight = x_weight + (constant_weight * mix[..., 0]).sum(-1)
        out = (constant_weight * mix[..., 1]).to(x.dtype) @ self.constant.to(x.dtype)
        return torch.addcmul(out, x_weight[:, None].to(x.dtype), x)


class DenseFFN(nn.Module):
    """Shared experts: one dense FFN of width num_shared * d_ff that every token goes through."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(_input_width(d_ff, activation), d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, d_ff))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = activation_reference(F.linear(x, self.w_in.to(x.dtype)), self.activation).to(x.dtype)
        return F.linear(hidden, self.w_out.to(x.dtype))
