"""Grouped GEMM for MoE experts: one matrix product per expert over its slice of expert-sorted rows.

`grouped_mm(x, w, offs)` computes `out[rows of g] = x[rows of g] @ w[g]` for x [M, K] (rows sorted
by group), w [G, K, N] (any strides: a transposed view of [G, N, K] weights is the usual input)
and `offs` int32 [G], the cumulative end row of every group (the `torch._grouped_mm` convention).
It is differentiable in x and w.

Backends, chosen per call:
- "torch": `torch._grouped_mm` (CUTLASS grouped GEMM on CUDA). Used where the build supports the
  inputs: bf16 on CUDA sm80+ (sm90 only before torch 2.9), fp32/bf16/fp16 on the CPU; every
  non-unit stride must be a multiple of 16 bytes.
- "triton": the kernels below, for CUDA dtypes/architectures torch lacks (fp16, fp32), and run on
  the CPU by the tests under TRITON_INTERPRET=1.
- "loop": `grouped_mm_reference`, a Python loop over groups (CPU fallback, reference).

The Triton forward walks "tiles of groups" without any host synchronisation: each group's rows are
cut into BLOCK_M tiles, the grid covers the worst case (cdiv(M, BLOCK_M) + G tiles) and a program
finds its group by counting the groups whose tiles end at or before its own tile index.
Rows past offs[-1] belong to no group; their output is unspecified ("torch") or zero ("triton",
"loop").

Under `torch.compile` bf16 on the "torch" backend stays `torch._grouped_mm` (the compiler knows
it); every other case is the custom op `sparta::grouped_mm` (opaque, no graph break), because
`torch._grouped_mm`'s fake kernel refuses the dtypes its CPU kernel runs (fp32, fp16) and the loop
reads the offsets on the host. Eager calls keep the direct paths (no custom-op dispatch cost).
"""
import os

import torch
import triton
import triton.language as tl

from .moe_reference import grouped_mm_reference, grouped_mm_weight_grad_reference

GROUPED_MM_IMPLS = ("torch", "triton", "loop")


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, offs_ptr, tile_end_ptr,
    N, K, G,
    stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_om, stride_on,
    G_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    groups = tl.arange(0, G_P2)
    tile_end = tl.load(tile_end_ptr + groups, mask=groups < G, other=2**30)
    g = tl.sum((tile_end <= tile).to(tl.int32))
    if g < G:
        first_tile = tl.load(tile_end_ptr + g - 1, mask=g > 0, other=0)
        row_start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        row_end = tl.load(offs_ptr + g)
        rows = row_start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < row_end
        col_mask = cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        w_group = w_ptr + g.to(tl.int64) * stride_wg + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_group + ks[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_weight_grad_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr,
    K, N,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwg, stride_dwk, stride_dwn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw[g] = x[rows of g]^T @ dy[rows of g]; an empty group gets zeros."""
    g = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    row_start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    row_end = tl.load(offs_ptr + g)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        a = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None] * stride_xk,
                    mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        b = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :] * stride_dyn,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out = dw_ptr + g.to(tl.int64) * stride_dwg + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_options(dtype: torch.dtype) -> dict:
    # The interpreter computes bf16 dots wrongly: it gets fp32 operands instead (see FACTS.md).
    upcast = _interpreting() and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return {"UPCAST": upcast, "INPUT_PRECISION": precision}


def _triton_forward(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    G, _, N = w.shape
    out = torch.zeros(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or G == 0:
        return out
    block_m, block_n, block_k = (32, 64, 32) if _interpreting() else (128, 128, 64)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    tile_end = torch.cumsum((counts + block_m - 1) // block_m, 0).to(torch.int32)
    grid = (triton.cdiv(M, block_m) + G, triton.cdiv(N, block_n))
    _grouped_mm_kernel[grid](
        x, w, out, offs, tile_end, N, K, G,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        G_P2=triton.next_power_of_2(G), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **_kernel_options(x.dtype),
    )
    return out


def _triton_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    K, N, G = x.shape[1], dy.shape[1], offs.shape[0]
    dw = torch.empty(G, K, N, dtype=x.dtype, device=x.device)
    if G == 0:
        return dw
    block_m, block_k, block_n = (32, 32, 64) if _interpreting() else (64, 128, 128)
    grid = (G, triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    _grouped_weight_grad_kernel[grid](
        x, dy, dw, offs, K, N,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, **_kernel_options(x.dtype),
    )
    return dw


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return _triton_forward(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _triton_forward(dy, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
        dw = _triton_weight_grad(x, dy, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _strides_aligned(t: torch.Tensor) -> bool:
    alignment = 16 // t.element_size()
    return all(s % alignment == 0 for s in t.stride() if s != 1)


@torch.compiler.assume_constant_result
def _cuda_runs_torch_grouped_mm(device_index: int) -> bool:
    """bf16 `torch._grouped_mm` on this CUDA device; a constant for torch.compile (it cannot trace
    the capability query)."""
    if torch.version.hip:
        return False
    major_minor = tuple(int(v) for v in torch.__version__.split(".")[:2])
    capability = torch.cuda.get_device_capability(device_index)
    return capability == (9, 0) or (major_minor >= (2, 9) and capability >= (8, 0))


def torch_grouped_mm_supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this torch build runs `torch._grouped_mm` on these inputs."""
    if not hasattr(torch, "_grouped_mm") or not (_strides_aligned(x) and _strides_aligned(w)):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    return _cuda_runs_torch_grouped_mm(x.device.index)


def _run(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, impl: str) -> torch.Tensor:
    """One backend, eagerly (autograd included)."""
    if impl == "torch":
        return torch._grouped_mm(x, w, offs=offs)
    if impl == "triton":
        return _TritonGroupedMM.apply(x, w, offs)
    return grouped_mm_reference(x, w, offs)


@torch.library.custom_op("sparta::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, impl: str) -> torch.Tensor:
    return _run(x, w, offs, impl)


@_grouped_mm_op.register_fake
def _(x, w, offs, impl):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("sparta::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, impl: str) -> torch.Tensor:
    """dw[g] = x[rows of g]^T @ dy[rows of g] ([G, K, N])."""
    if impl == "triton":
        return _triton_weight_grad(x, dy.contiguous(), offs)
    return grouped_mm_weight_grad_reference(x, dy, offs)


@_grouped_mm_weight_grad_op.register_fake
def _(x, dy, offs, impl):
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_op_setup(ctx, inputs, output):
    x, w, offs, ctx.impl = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_op_backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        w_t = w.transpose(-2, -1)
        impl = ctx.impl if ctx.impl != "torch" or torch_grouped_mm_supports(dy, w_t) else "loop"
        dx = _grouped_mm_op(dy.contiguous(), w_t, offs, impl)
    if ctx.needs_input_grad[1]:
        dw = _grouped_mm_weight_grad_op(x, dy, offs, ctx.impl)
    return dx, dw, None, None


_grouped_mm_op.register_autograd(_grouped_mm_op_backward, setup_context=_grouped_mm_op_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Grouped matrix product `out[rows of g] = x[rows of g] @ w[g]` (see the module docstring).

    impl: "torch", "triton", "loop" or None to pick the fastest backend that supports the inputs.
    """
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm expects x [M, K] and w [G, K, N], got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has K={x.shape[1]} columns but w has K={w.shape[1]} rows per group")
    if offs.dtype != torch.int32 or offs.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: offs must be int32 of shape ({w.shape[0]},), got {offs.dtype} {tuple(offs.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if impl is None:
        impl = "torch" if torch_grouped_mm_supports(x, w) else ("triton" if x.is_cuda else "loop")
    if impl not in GROUPED_MM_IMPLS:
        raise ValueError(f"grouped_mm: impl must be one of {GROUPED_MM_IMPLS} or None, got {impl!r}")
    if torch.compiler.is_compiling() and not (impl == "torch" and x.dtype == torch.bfloat16):
        return _grouped_mm_op(x, w, offs, impl)
    return _run(x, w, offs, impl)
