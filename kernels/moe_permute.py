"""Token permutation for MoE experts: gather into expert-sorted rows, sum back, weighted activation.

The routing plan (see `moe_reference.py` for the conventions) gives both directions of the map
between tokens and expert-sorted rows: `row_token` [R] (row -> token) and `token_pos` [T, S]
(token slot -> row or -1). With both, every step is a *gather*, so nothing needs atomics and the
results are deterministic:

- `permute`:   rows[r] = x[row_token[r]];             backward dx[t] = sum_j drows[token_pos[t, j]]
- `unpermute`: y[t] = sum_j rows[token_pos[t, j]];    backward drows[r] = dy[row_token[r]]

The routing weight is not applied in `unpermute`: `weighted_activation` multiplies the expert's
hidden activation by it, before the down projection. Since the down projection is linear this is
the same function, and it is where the weight is cheapest: its gradient
`dw[r] = <d_act[r], act(h[r])>` falls out of the activation backward, which reads both anyway,
so the expert outputs never have to be saved for the backward pass.

Padding rows (row_token -1, at the end of the buffer, past `offs[-1]`) let the caller size the
buffer statically and skip the host synchronisation a data-dependent size needs; the kernels never
read them (their content is whatever the grouped GEMM left there, possibly NaN).

Each op has a Triton path (CUDA, or the CPU under TRITON_INTERPRET=1 with `use_triton=True`) and
the pure-torch path of `moe_reference.py` (the default off CUDA); `use_triton` picks one. Under
`torch.compile` the Triton path is a `torch.library` custom op (`sparta::moe_permute`, ...): opaque
to the compiler, so that a data-dependent number of rows (BlockFFN) never reaches the launch
arithmetic; eager calls keep the autograd.Functions (no custom-op dispatch cost).
"""
import os

import torch
import triton
import triton.language as tl

from .moe_reference import (
    ACTIVATIONS,
    permute_reference,
    unpermute_reference,
    weighted_activation_reference,
)

_ACTIVATION_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}  # swiglu 0, relu 1, gelu 2, silu 3


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr, num_rows, D, stride_src, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    src_rows = tl.load(index_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int64)
    mask = (src_rows >= 0)[:, None] & (cols < D)[None, :]  # index -1: padding row, left unwritten
    values = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], values, mask=mask)


@triton.jit
def _gather_sum_kernel(
    src_ptr, pos_ptr, out_ptr, num_tokens, S, D, stride_src, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[t] = sum of src[pos[t, j]] over the slots j with pos[t, j] >= 0. The loop stops at the last
    used slot of the block's tokens: with each token's rows first (`build_plan_from_mask`), it runs over
    the rows a token has, not over all S slots."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    col_mask = cols < D
    slots = tl.arange(0, BLOCK_S)
    pos_rows = pos_ptr + tokens.to(tl.int64) * S
    pos = tl.load(pos_rows[:, None] + slots[None, :], mask=token_mask[:, None] & (slots < S)[None, :], other=-1)
    num_slots = tl.max(tl.max(tl.where(pos >= 0, slots[None, :] + 1, 0), axis=1), axis=0)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(num_slots):
        rows = tl.load(pos_rows + j, mask=token_mask, other=-1)
        mask = (rows >= 0)[:, None] & col_mask[None, :]
        values = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
        acc += values.to(tl.float32)
    out = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & col_mask[None, :])


@triton.jit
def _activation(g, up, ACT: tl.constexpr):
    """Activation in fp32 (swiglu: silu(g) * up; relu; erf-gelu; silu)."""
    if ACT == 0:
        return g * tl.sigmoid(g) * up
    elif ACT == 1:
        return tl.maximum(g, 0.0)
    elif ACT == 2:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        return g * tl.sigmoid(g)


@triton.jit
def _weighted_activation_fwd_kernel(
    h_ptr, w_ptr, a_ptr, num_rows_ptr, F, stride_h, stride_a,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < tl.load(num_rows_ptr)  # rows past it are padding: not read, not written
    mask = row_mask[:, None] & (cols < F)[None, :]
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    g = tl.load(h_rows, mask=mask, other=0.0).to(tl.float32)
    up = g
    if ACT == 0:
        up = tl.load(h_rows + F, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    a = _activation(g, up, ACT) * w[:, None]
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_activation_bwd_kernel(
    h_ptr, w_ptr, da_ptr, dh_ptr, dw_ptr, R, num_rows_ptr, F, stride_h, stride_da, stride_dh,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """dh = d act(h) * w * da; dw[r] = sum_f da[r, f] * act(h[r, f]) (one program per row block).
    Padding rows (past num_rows) get dw = 0 and an unwritten dh."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < tl.load(num_rows_ptr)
    w = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    da_rows = da_ptr + rows.to(tl.int64)[:, None] * stride_da
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_mask[:, None] & (cols < F)[None, :]
        g = tl.load(h_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            up = tl.load(h_rows + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            dw += tl.sum(da * silu * up, axis=1)
            d_act = da * w[:, None]
            dg = d_act * up * (sig + silu * (1.0 - sig))
            tl.store(dh_rows + F + cols[None, :], (d_act * silu).to(dh_ptr.dtype.element_ty), mask=mask)
        else:
            dw += tl.sum(da * _activation(g, g, ACT), axis=1)
            d_act = da * w[:, None]
            if ACT == 1:
                dg = tl.where(g > 0, d_act, 0.0)
            elif ACT == 2:
                cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
                pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
                dg = d_act * (cdf + g * pdf)
            else:
                sig = tl.sigmoid(g)
                dg = d_act * (sig + g * sig * (1.0 - sig))
        tl.store(dh_rows + cols[None, :], dg.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + rows, dw, mask=rows < R)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _row_blocks(num_rows: int, width: int, max_cols: int, elements: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile: about `elements` values on the GPU (a few KB moved
    per program, no register spills); as few programs as possible in the interpreter, whose cost
    is per program."""
    block_cols = min(triton.next_power_of_2(max(width, 1)), max_cols)
    budget = 1 << 16 if _interpreting() else elements
    block_rows = max(1, min(budget // block_cols, triton.next_power_of_2(max(num_rows, 1))))
    return block_rows, block_cols


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.empty(index.shape[0], src.shape[1], dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    block_r, block_d = _row_blocks(out.shape[0], out.shape[1], max_cols=2048, elements=8192)
    grid = (triton.cdiv(out.shape[0], block_r), triton.cdiv(out.shape[1], block_d))
    _gather_rows_kernel[grid](src, index, out, out.shape[0], out.shape[1], src.stride(0), out.stride(0),
                              BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _gather_sum(src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    num_tokens, slots = pos.shape
    out = torch.empty(num_tokens, src.shape[1], dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    block_t, block_d = _row_blocks(num_tokens, src.shape[1], max_cols=2048, elements=4096)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(src.shape[1], block_d))
    _gather_sum_kernel[grid](src, pos, out, num_tokens, slots, src.shape[1], src.stride(0), out.stride(0),
                             BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(slots))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_token, token_pos):
        ctx.save_for_backward(token_pos)
        return _gather_rows(x, row_token)

    @staticmethod
    def backward(ctx, d_rows):
        (token_pos,) = ctx.saved_tensors
        return _gather_sum(d_rows.contiguous(), token_pos), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, row_token, token_pos):
        ctx.save_for_backward(row_token)
        return _gather_sum(rows, token_pos)

    @staticmethod
    def backward(ctx, dy):
        (row_token,) = ctx.saved_tensors
        return _gather_rows(dy.contiguous(), row_token), None, None


def _weighted_activation_forward(h: torch.Tensor, row_weight: torch.Tensor, activation: str,
                                 num_rows: torch.Tensor) -> torch.Tensor:
    width = h.shape[1] // 2 if activation == "swiglu" else h.shape[1]
    a = torch.empty(h.shape[0], width, dtype=h.dtype, device=h.device)
    if a.numel():
        block_r, block_f = _row_blocks(a.shape[0], width, max_cols=1024, elements=4096)
        grid = (triton.cdiv(a.shape[0], block_r), triton.cdiv(width, block_f))
        _weighted_activation_fwd_kernel[grid](h, row_weight, a, num_rows, width, h.stride(0), a.stride(0),
                                              ACT=_ACTIVATION_CODE[activation], BLOCK_R=block_r, BLOCK_F=block_f)
    return a


def _weighted_activation_backward(da: torch.Tensor, h: torch.Tensor, row_weight: torch.Tensor, activation: str,
                                  num_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    da = da.contiguous()
    width = da.shape[1]
    dh = torch.empty_like(h)
    dw = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    if h.shape[0]:
        block_r, block_f = _row_blocks(h.shape[0], width, max_cols=512, elements=2048)
        _weighted_activation_bwd_kernel[(triton.cdiv(h.shape[0], block_r),)](
            h, row_weight, da, dh, dw, h.shape[0], num_rows, width, h.stride(0), da.stride(0), dh.stride(0),
            ACT=_ACTIVATION_CODE[activation], BLOCK_R=block_r, BLOCK_F=block_f)
    return dh, dw.to(row_weight.dtype)


class _WeightedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, row_weight, activation, num_rows):
        ctx.save_for_backward(h, row_weight, num_rows)
        ctx.activation = activation
        return _weighted_activation_forward(h, row_weight, activation, num_rows)

    @staticmethod
    def backward(ctx, da):
        h, row_weight, num_rows = ctx.saved_tensors
        return *_weighted_activation_backward(da, h, row_weight, ctx.activation, num_rows), None, None


# The same kernels as custom ops, for torch.compile. permute and unpermute are each other's adjoint,
# so each one's backward is the other op.
@torch.library.custom_op("sparta::moe_permute", mutates_args=())
def _permute_op(x: torch.Tensor, row_token: torch.Tensor, token_pos: torch.Tensor) -> torch.Tensor:
    return _gather_rows(x.contiguous(), row_token)


@_permute_op.register_fake
def _(x, row_token, token_pos):
    return x.new_empty(row_token.shape[0], x.shape[1])


@torch.library.custom_op("sparta::moe_unpermute", mutates_args=())
def _unpermute_op(rows: torch.Tensor, row_token: torch.Tensor, token_pos: torch.Tensor) -> torch.Tensor:
    return _gather_sum(rows.contiguous(), token_pos.contiguous())


@_unpermute_op.register_fake
def _(rows, row_token, token_pos):
    return rows.new_empty(token_pos.shape[0], rows.shape[1])


def _save_plan(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


def _permute_op_backward(ctx, d_rows):
    return _unpermute_op(d_rows, *ctx.saved_tensors), None, None


def _unpermute_op_backward(ctx, dy):
    return _permute_op(dy, *ctx.saved_tensors), None, None


_permute_op.register_autograd(_permute_op_backward, setup_context=_save_plan)
_unpermute_op.register_autograd(_unpermute_op_backward, setup_context=_save_plan)


@torch.library.custom_op("sparta::moe_weighted_activation", mutates_args=())
def _weighted_activation_op(h: torch.Tensor, row_weight: torch.Tensor, num_rows: torch.Tensor,
                            activation: str) -> torch.Tensor:
    return _weighted_activation_forward(h.contiguous(), row_weight.contiguous(), activation, num_rows)


@_weighted_activation_op.register_fake
def _(h, row_weight, num_rows, activation):
    return h.new_empty(h.shape[0], h.shape[1] // 2 if activation == "swiglu" else h.shape[1])


@torch.library.custom_op("sparta::moe_weighted_activation_backward", mutates_args=())
def _weighted_activation_backward_op(da: torch.Tensor, h: torch.Tensor, row_weight: torch.Tensor,
                                     num_rows: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _weighted_activation_backward(da, h.contiguous(), row_weight, activation, num_rows)


@_weighted_activation_backward_op.register_fake
def _(da, h, row_weight, num_rows, activation):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(row_weight)


def _weighted_activation_op_setup(ctx, inputs, output):
    h, row_weight, num_rows, ctx.activation = inputs
    ctx.save_for_backward(h, row_weight, num_rows)


def _weighted_activation_op_backward(ctx, da):
    h, row_weight, num_rows = ctx.saved_tensors
    dh, dw = _weighted_activation_backward_op(da, h, row_weight, num_rows, ctx.activation)
    return dh, dw, None, None


_weighted_activation_op.register_autograd(_weighted_activation_op_backward, setup_context=_weighted_activation_op_setup)


def _check_plan(num_tokens: int, row_token: torch.Tensor, token_pos: torch.Tensor) -> None:
    if token_pos.dim() != 2 or token_pos.shape[0] != num_tokens:
        raise ValueError(f"token_pos must be [num_tokens={num_tokens}, slots], got {tuple(token_pos.shape)}")
    if row_token.dtype != torch.int32 or token_pos.dtype != torch.int32:
        raise ValueError(f"row_token and token_pos must be int32, got {row_token.dtype} and {token_pos.dtype}")


def permute(x: torch.Tensor, row_token: torch.Tensor, token_pos: torch.Tensor, *,
            use_triton: bool | None = None) -> torch.Tensor:
    """Expert-sorted copy of the tokens: `rows[r] = x[row_token[r]]` ([R, d], differentiable in x).
    Padding rows (row_token -1) are left unwritten on the Triton path, zero on the torch path."""
    _check_plan(x.shape[0], row_token, token_pos)
    if use_triton if use_triton is not None else x.is_cuda:
        if torch.compiler.is_compiling():
            return _permute_op(x, row_token, token_pos)
        return _Permute.apply(x.contiguous(), row_token, token_pos.contiguous())
    return permute_reference(x, row_token)


def unpermute(rows: torch.Tensor, row_token: torch.Tensor, token_pos: torch.Tensor, *,
              use_triton: bool | None = None) -> torch.Tensor:
    """Sum the rows back into their tokens: `y[t] = sum_j rows[token_pos[t, j]]` ([T, d]).
    Padding rows are never read, and get no gradient."""
    _check_plan(token_pos.shape[0], row_token, token_pos)
    if use_triton if use_triton is not None else rows.is_cuda:
        if torch.compiler.is_compiling():
            return _unpermute_op(rows, row_token, token_pos)
        return _Unpermute.apply(rows.contiguous(), row_token, token_pos.contiguous())
    return unpermute_reference(rows, row_token, token_pos.shape[0])


def weighted_activation(h: torch.Tensor, row_weight: torch.Tensor, activation: str, *,
                        num_rows: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """`act(h[r]) * row_weight[r]` in fp32, stored in h's dtype; swiglu takes `h = [gate | up]`.

    num_rows: 1-element int tensor on h's device (e.g. `offs[-1:]`, so no host synchronisation);
    rows at or past it are padding: never read (they may hold garbage, even NaN), their output is
    unspecified and their gradients are 0. None: every row is real.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if row_weight.shape != (h.shape[0],):
        raise ValueError(f"row_weight must be [{h.shape[0]}] (one weight per row of h), got {tuple(row_weight.shape)}")
    if num_rows is None:
        num_rows = torch.full((1,), h.shape[0], dtype=torch.int32, device=h.device)
    if num_rows.numel() != 1 or num_rows.device != h.device:
        raise ValueError(f"num_rows must be a 1-element tensor on {h.device}, got {tuple(num_rows.shape)} on {num_rows.device}")
    if use_triton if use_triton is not None else h.is_cuda:
        if torch.compiler.is_compiling():
            return _weighted_activation_op(h, row_weight, num_rows.reshape(1), activation)
        return _WeightedActivation.apply(h.contiguous(), row_weight.contiguous(), activation, num_rows.reshape(1))
    return weighted_activation_reference(h, row_weight, activation, num_rows)
