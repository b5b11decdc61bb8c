"""BlockLayout: the one representation every attention pattern compiles to.

A layout is a bool block mask [B|1, H, Qb, Kb]: query block i of head h attends key block j.
Block granularity is what the kernel computes, so a pattern's exact token pairs are the union of
the blocks that touch it ("block cover"); nothing is element-masked except the sequence end.

Some patterns only fill whole blocks after the tokens are reordered (3-D tiles made contiguous).
Such a layout carries a `TokenOrder`: the kernel's token `t` is the model's token
`order.permutation()[t]`. The reorder is applied around the kernel call, never inside it, and
`element_mask()` maps the blocks back to the model's token order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

import sparta.kernels as K


class TokenOrder(Protocol):
    """A fixed permutation of a sequence; equal orders compare equal and hash alike, so layouts
    (and the heads that use them) can be grouped by order."""

    def permutation(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [N]: kernel position t holds model token permutation[t]."""
        ...


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inverse[perm[t]] = t, on perm's device without host synchronisation."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per-head block mask plus the geometry needed to run it (see the module docstring)."""

    mask: torch.Tensor  # bool [B|1, H, Qb, Kb]
    seqlen_q: int
    seqlen_k: int
    block_q: int = 128
    block_k: int = 128
    order: TokenOrder | None = None  # None: the model's own token order

    def __post_init__(self):
        for name in ("seqlen_q", "seqlen_k", "block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        mask = self.mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask)
            raise ValueError(f"mask: expected a bool tensor [B|1, H, Qb, Kb], got {got}")
        expected = (_cdiv(self.seqlen_q, self.block_q), _cdiv(self.seqlen_k, self.block_k))
        if tuple(mask.shape[2:]) != expected:
            raise ValueError(f"mask: seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k} with blocks "
                             f"({self.block_q}, {self.block_k}) need {expected} blocks, got {tuple(mask.shape[2:])}")
        if self.order is not None and self.seqlen_q != self.seqlen_k:
            raise ValueError(f"order: a token reorder needs seqlen_q == seqlen_k, got {self.seqlen_q} "
                             f"and {self.seqlen_k}")

    @classmethod
    def full(cls, heads: int, seqlen_q: int, seqlen_k: int | None = None, *, block_q: int = 128,
             block_k: int = 128, device: torch.device | str | None = None) -> BlockLayout:
        """Every block pair attended: the layout that reproduces dense attention."""
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        shape = (1, heads, _cdiv(seqlen_q, block_q), _cdiv(seqlen_k, block_k))
        return cls(torch.ones(shape, dtype=torch.bool, device=device), seqlen_q, seqlen_k, block_q, block_k)

    @property
    def heads(self) -> int:
        return self.mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def density(self) -> torch.Tensor:
        """Fraction of block pairs computed, per head (float [H], averaged over the batch)."""
        return self.mask.float().mean(dim=(0, 2, 3))

    def union(self, other: BlockLayout) -> BlockLayout:
        self._check_compatible(other)
        return self._with_mask(self.mask | other.mask)

    def intersection(self, other: BlockLayout) -> BlockLayout:
        self._check_compatible(other)
        return self._with_mask(self.mask & other.mask)

    def repeat_heads(self, heads: int) -> BlockLayout:
        """A one-head layout copied to `heads` heads (e.g. one pattern for a whole layer)."""
        if self.heads != 1:
            raise ValueError(f"heads: repeat_heads needs a one-head layout, this one has {self.heads}")
        return self._with_mask(self.mask.expand(-1, heads, -1, -1).contiguous())

    def select_heads(self, heads: Sequence[int]) -> BlockLayout:
        """The masks of `heads` only, renumbered 0.. in that order (a sequence-parallel rank's heads)."""
        if not heads or min(heads) < 0 or max(heads) >= self.heads:
            raise ValueError(f"heads: expected indices of this layout's {self.heads} heads, got {heads}")
        return self._with_mask(self.mask[:, list(heads)])

    @staticmethod
    def concat_heads(layouts: Sequence[BlockLayout]) -> BlockLayout:
        """Stack layouts along the head dim: per-head patterns that run in one kernel call."""
        if not layouts:
            raise ValueError("layouts: expected at least one layout")
        first = layouts[0]
        for other in layouts[1:]:
            first._check_compatible(other)
        batch = max(layout.mask.shape[0] for layout in layouts)
        masks = [layout.mask.expand(batch, -1, -1, -1) for layout in layouts]
        return first._with_mask(torch.cat(masks, dim=1))

    def to(self, device: torch.device | str) -> BlockLayout:
        return self._with_mask(self.mask.to(device))

    def to_kernel(self) -> K.KernelLayout:
        """The kernel's index form (kv_count / kv_full_count / kv_index ...), built once per layout.

        Layouts are immutable, so the result is memoised on the instance.
        """
        kernel = self.__dict__.get("_kernel")
        if kernel is None:
            kernel = K.build_kernel_layout(self.mask, self.block_q, self.block_k, seqlen_q=self.seqlen_q,
                                           seqlen_k=self.seqlen_k, causal=False)
            object.__setattr__(self, "_kernel", kernel)
        return kernel

    def element_mask(self) -> torch.Tensor:
        """bool [B|1, H, seqlen_q, seqlen_k] in the MODEL's token order. Materialises N^2: tests only."""
        rows = torch.arange(self.seqlen_q, device=self.device)
        cols = torch.arange(self.seqlen_k, device=self.device)
        if self.order is not None:  # model token t sits at kernel position inverse[t]
            rows = cols = invert_permutation(self.order.permutation(self.device))
        return self.mask[:, :, rows // self.block_q][:, :, :, cols // self.block_k]

    def save_png(self, path, heads: Sequence[int] | None = None, columns: int = 8) -> None:
        """Heat-map of the block mask, one panel per head (batch entry 0), for humans and MLflow."""
        from matplotlib.figure import Figure  # optional dependency: only needed for pictures

        heads = list(range(self.heads)) if heads is None else list(heads)
        columns = min(columns, len(heads))
        rows = _cdiv(len(heads), columns)
        figure = Figure(figsize=(2.2 * columns, 2.4 * rows))
        density = self.density().tolist()
        mask = self.mask[0].cpu()
        for panel, head in enumerate(heads):
            axes = figure.add_subplot(rows, columns, panel + 1)
            axes.imshow(mask[head].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            axes.set_title(f"head {head}: {density[head]:.1%}", fontsize=8)
            axes.set_xticks([])
            axes.set_yticks([])
        figure.tight_layout()
        figure.savefig(path, dpi=120)

    def _with_mask(self, mask: torch.Tensor) -> BlockLayout:
        return BlockLayout(mask, self.seqlen_q, self.seqlen_k, self.block_q, self.block_k, self.order)

    def _check_compatible(self, other: BlockLayout) -> None:
        mine = (self.seqlen_q, self.seqlen_k, self.block_q, self.block_k, self.order)
        theirs = (other.seqlen_q, other.seqlen_k, other.block_q, other.block_k, other.order)
        if mine != theirs:
            raise ValueError(f"other: layouts differ in (seqlen_q, seqlen_k, block_q, block_k, order): "
                             f"{mine} vs {theirs}")
        if other.device != self.device:
            raise ValueError(f"other: on {other.device}, this layout on {self.device}")


@dataclass(frozen=True)
class HeadGroup:
    """Query heads that run together in one attention call.

    `layout` holds one mask per head of `heads` (in that order); None runs them densely (SDPA).
    Heads of a layer that are in no group are skipped: their output is zero.
    """

    heads: tuple[int, ...]
    layout: BlockLayout | None

    def __post_init__(self):
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads: expected distinct head indices, got {self.heads}")
        if self.layout is not None and self.layout.heads != len(self.heads):
            raise ValueError(f"layout: has {self.layout.heads} heads, the group has {len(self.heads)}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
