"""SparseAttention: a drop-in attention layer whose pattern comes from a layout provider.

    q, k, v = projections(x), rotary applied          [B, H, N, D]
    groups  = provider(q, k, layer)                   None = dense, else a list of HeadGroup
    o       = attend(q, k, v, groups, backend)        one kernel call per head group
    y       = out_projection(o)

Providers: a `BlockLayout` for all heads, a loaded search `Plan` (per-layer, per-head patterns,
heads fused by token order), a `SparseDSchedule` (diffusion LMs), a `DynamicBlockSelection`.
Backends: "triton" (sparta's block-sparse kernel), "reference" (the same math in plain torch from
the element mask, for checks on small shapes), "dense" (SDPA; ignores the provider).

Sequence parallelism (DeepSpeed-Ulysses, `sequence_group` of P ranks): each rank projects its N/P
tokens, an all-to-all gives it H/P heads of all N tokens (`sequence_parallel.py`), rotary and
attention run there, and a second all-to-all brings the output back to its tokens. A head's pattern
follows the head to its rank. The provider contract: a provider is called with the q, k the core
holds and numbers heads as they are in q (0 .. H/P - 1 on a rank). Providers that compute the
pattern from q, k (`SparseDSchedule`, `DynamicBlockSelection`) need nothing more. A provider whose
patterns are fixed per global head (`BlockLayout`, `Plan`) defines `select_heads(heads)`, and the
core, which knows its global query heads (`SparseAttentionCore.heads`), cuts it to them once,
whenever its layout is set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sparta.kernels as K
from sparta.attention.layout import BlockLayout, HeadGroup, TokenOrder, invert_permutation
from sparta.attention.sequence_parallel import heads_to_sequence, sequence_to_heads
from sparta.attention.video import VideoGrid

BACKENDS = ("triton", "reference", "dense")
LayoutProvider = Callable[[torch.Tensor, torch.Tensor, int], Sequence[HeadGroup] | None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: Sequence[HeadGroup] | None, *,
           backend: str = "triton", sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, N, D] over k, v [B, Hkv, N, D] (Hq % Hkv == 0, GQA), head group by head group.

    `groups=None` (or backend "dense") is dense attention. Otherwise each group is one call, in
    order; a head's output comes from the LAST group that lists it, heads in no group output zeros.
    A group of every head (in order) runs on q, k, v as they are, with no copy; a group of some
    heads gathers them, each query head with its own copy of its key/value head. Tokens go into a
    layout's token order for the kernel and back.
    """
    _check_qkv(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "dense" or groups is None:
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale, enable_gqa=q.shape[1] != k.shape[1])
    query_heads, group_size = q.shape[1], q.shape[1] // k.shape[1]
    out = None
    for group in groups:
        if max(group.heads) >= query_heads:
            raise ValueError(f"groups: head {max(group.heads)} out of range for {query_heads} query heads")
        if group.heads == tuple(range(query_heads)):
            out = _attend_group(q, k, v, group.layout, backend, sm_scale)
            continue
        index = _head_index(group.heads, q.device)
        group_out = _attend_group(q[:, index], k[:, index // group_size], v[:, index // group_size], group.layout,
                                  backend, sm_scale)
        out = (q.new_zeros(q.shape) if out is None else out).index_copy(1, index, group_out)
    return q.new_zeros(q.shape) if out is None else out


@functools.lru_cache(maxsize=256)
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, device=device)


def _attend_group(q, k, v, layout: BlockLayout | None, backend: str, sm_scale: float | None) -> torch.Tensor:
    if layout is None:
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale, enable_gqa=q.shape[1] != k.shape[1])
    if layout.seqlen_q != q.shape[-2] or layout.seqlen_k != k.shape[-2]:
        raise ValueError(f"layout: built for seqlen_q={layout.seqlen_q}, seqlen_k={layout.seqlen_k}, "
                         f"got q with {q.shape[-2]} tokens and k with {k.shape[-2]}")
    if backend == "reference":  # the element mask is already in the model's token order
        return masked_attention(q, k, v, layout.element_mask(), sm_scale)
    if layout.order is None:
        return K.block_sparse_attention(q, k, v, layout.to_kernel(), sm_scale=sm_scale)
    order = layout.order.permutation(q.device)
    q, k, v = (x.index_select(2, order) for x in (q, k, v))
    out = K.block_sparse_attention(q, k, v, layout.to_kernel(), sm_scale=sm_scale)
    return out.index_select(2, invert_permutation(order))


def masked_attention(q, k, v, mask: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, allowed by `mask`) v in fp32, in plain torch; rows with no allowed key
    output zeros (as the kernel does). Materialises [B, H, N, N]: small shapes only."""
    group_size = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    logits = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)
    return (probs @ v.float()).to(q.dtype)


class SparseAttentionCore(nn.Module):
    """The attention op alone (no weights): provider -> layout -> backend.

    A separate module so that `search.capture_qkv` can hook exactly the q, k, v it receives.
    `heads`: the layer's global query heads that q holds (a sequence-parallel rank's share), None for
    all of them; a layout with `select_heads` is cut to them whenever it is set (module docstring).
    """

    def __init__(self, layout: BlockLayout | LayoutProvider | None = None, *, layer: int = 0,
                 backend: str = "triton", sm_scale: float | None = None, heads: range | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.heads, self.layer, self.backend, self.sm_scale = heads, layer, backend, sm_scale
        self.layout = layout

    @property
    def layout(self) -> BlockLayout | LayoutProvider | None:
        """The layout as given, for all heads of the layer."""
        return self._layout

    @layout.setter
    def layout(self, layout: BlockLayout | LayoutProvider | None) -> None:
        if not (layout is None or isinstance(layout, BlockLayout) or callable(layout)):
            raise ValueError(f"layout: expected a BlockLayout, a layout provider or None, got {type(layout).__name__}")
        self._layout = layout
        self._own_heads_layout = layout
        if self.heads is not None and hasattr(layout, "select_heads"):
            self._own_heads_layout = layout.select_heads(self.heads)

    # Layouts are Python objects whose kernel form is built and cached on first use: under torch.compile the
    # op runs eagerly between the compiled graphs around it (the kernels are opaque to the compiler anyway).
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout = self._own_heads_layout
        if isinstance(layout, BlockLayout):
            groups = [HeadGroup(tuple(range(q.shape[1])), layout)]
        elif layout is None or self.backend == "dense":
            groups = None
        else:
            groups = layout(q, k, self.layer)
        return attend(q, k, v, groups, backend=self.backend, sm_scale=self.sm_scale)


class SparseAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections, optional rotary embeddings and GQA.

    rotary: None, "1d" (positions 0..N-1, N at most `max_tokens`) or "3d" (frame, row, column of `grid`;
    text tokens are not rotated). x is [B, N, dim]; N must equal `grid.tokens` for "3d". Either way the
    cos/sin tables are made once, as buffers: computed in the forward, a compiled model would
    recompute them inside every rotation kernel.
    token_order: the order of x's tokens (None: raster), e.g. a video DiT's `TileOrder`: token t is
    raster token `token_order.permutation()[t]`, and "3d" rotary rotates it by that token's
    coordinates. Build its layouts for the same order (`Pattern.build(..., token_order=)`).

    sequence_group: a process group of P ranks that share each sequence (module docstring). x is then
    this rank's shard [B, N/P, dim] of the tokens (`sequence_shard`), and so is the output; rotary
    uses the global positions. num_heads and num_kv_heads must be multiples of P. The weights are
    replicated: sum their gradients over the group. None, or a group of one rank: no parallelism.
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, rotary: str | None = None,
                 grid: VideoGrid | None = None, max_tokens: int | None = None, rotary_base: float = 10000.0,
                 layout: BlockLayout | LayoutProvider | None = None, layer: int = 0, backend: str = "triton",
                 bias: bool = False, sequence_group: dist.ProcessGroup | None = None,
                 token_order: TokenOrder | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a positive divisor of num_heads={num_heads}, got {num_kv_heads}")
        head_dim = dim // num_heads
        if rotary not in (None, "1d", "3d"):
            raise ValueError(f"rotary: expected None, '1d' or '3d', got {rotary!r}")
        if rotary is not None and head_dim % 2:
            raise ValueError(f"rotary: needs an even head dim, got {head_dim}")
        if rotary == "3d" and grid is None:
            raise ValueError("grid: rotary='3d' needs the VideoGrid of the tokens")
        if rotary == "1d" and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: rotary='1d' needs the longest sequence (a positive int), got {max_tokens!r}")
        ranks = 1 if sequence_group is None else dist.get_world_size(sequence_group)
        if num_heads % ranks or num_kv_heads % ranks:
            raise ValueError(f"sequence_group: its {ranks} ranks split the heads, so num_heads={num_heads} and "
                             f"num_kv_heads={num_kv_heads} must be multiples of {ranks}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary, self.grid, self.token_order = rotary, grid, token_order
        self.sequence_group = sequence_group if ranks > 1 else None
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=bias)
        heads = None
        if self.sequence_group is not None:
            first = dist.get_rank(sequence_group) * num_heads // ranks
            heads = range(first, first + num_heads // ranks)
        self.core = SparseAttentionCore(layout, layer=layer, backend=backend, heads=heads)
        if rotary == "1d":
            angles = rotary_angles_1d(max_tokens, head_dim, rotary_base)
        elif rotary == "3d":
            angles = rotary_angles_3d(grid, head_dim, rotary_base)
            if token_order is not None:
                angles = angles[token_order.permutation()]
        if rotary is not None:  # buffers follow the model's device and dtype
            self.register_buffer("rotary_cos", angles.cos(), persistent=False)
            self.register_buffer("rotary_sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x: expected [B, N, dim], got shape {tuple(x.shape)}")
        batch, tokens, _ = x.shape
        group = self.sequence_group
        ranks = 1 if group is None else dist.get_world_size(group)
        shards = "" if ranks == 1 else f" on each of {ranks} sequence-parallel ranks"
        if self.rotary == "3d" and tokens * ranks != self.grid.tokens:
            raise ValueError(f"x: {tokens} tokens{shards}, the grid {self.grid} has {self.grid.tokens}")
        if self.rotary == "1d" and tokens * ranks > self.rotary_cos.shape[0]:
            raise ValueError(f"x: {tokens} tokens{shards}, more than max_tokens={self.rotary_cos.shape[0]}")
        q, k, v = self.qkv(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        if group is not None:
            q, k, v = (sequence_to_heads(t, group) for t in (q, k, v))
        if self.rotary is not None:  # after the all-to-all every rank holds whole sequences: global positions
            cos, sin = self.rotary_cos[:q.shape[-2]], self.rotary_sin[:q.shape[-2]]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v)
        if group is not None:
            out = heads_to_sequence(out, group)
        return self.out(out.transpose(1, 2).reshape(batch, tokens, -1))

def rotary_angles_1d(tokens: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles fp32 [tokens, head_dim / 2]: position * base^(-2i / head_dim)."""
    return torch.arange(tokens, dtype=torch.float32)[:, None] * _frequencies(head_dim // 2, base)


def rotary_angles_3d(grid: VideoGrid, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles fp32 [grid.tokens, head_dim / 2]: the pairs split between frame, row and column
    (1/4, 3/8, 3/8 of them, as in video DiTs), each rotated by its own coordinate; text gets 0."""
    pairs = head_dim // 2
    row_pairs = column_pairs = 3 * pairs // 8
    frame_pairs = pairs - row_pairs - column_pairs
    angles = [coordinate.float()[:, None] * _frequencies(count, base)
              for coordinate, count in zip(grid.coords(), (frame_pairs, row_pairs, column_pairs))]
    video = torch.cat(angles, dim=-1)
    return torch.cat([video.new_zeros(grid.text, pairs), video])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, N, D] by the cos and sin of angles [N, D / 2] (rotate-half layout: pair i is
    (x_i, x_{i + D/2})), in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def _frequencies(count: int, base: float) -> torch.Tensor:
    return base ** (-torch.arange(count, dtype=torch.float32) / max(count, 1))


def _check_qkv(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v: expected [B, H, N, D] with v shaped like k, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k: shape {tuple(k.shape)} does not fit q {tuple(q.shape)} (same batch and head dim, "
                         f"query heads a multiple of key heads)")
