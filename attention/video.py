"""Attention patterns of video diffusion transformers on a (frames, height, width) latent grid.

Token order: the builders assume the raster order, `text` text tokens first, then the video tokens
in raster order (frame, row, column). A model that keeps its tokens in another order (a video DiT in
tile-major order) builds with `token_order=` (`Pattern.build`, `in_token_order`): a layout whose own
order is the model's then runs on the tokens as they are, any other one is handed its tokens in its
own order by composing the two (`RelativeOrder`).
Text is global in every pattern except `skip`: text queries attend every key and every query
attends the text keys. Each builder returns a one-head `BlockLayout` whose blocks are the block
cover of the pattern's token pairs (a block pair is attended iff some token pair in it is):

- `diagonal(width)`: video token i attends video token j iff |i - j| <= width (raster distance).
- `multi_diagonal(width, frame_radius)`: |i - j - m * frame_size| <= width for some frame offset
  |m| <= frame_radius: the same spatial position (+- width) in the neighbouring frames.
- `temporal(width)`: `multi_diagonal` over all frames (Sparse VideoGen's temporal head).
- `stripe(keys)`: every query attends the key token ranges `keys` (text, first frame, sinks).
- `tiles(tile, window)`: sliding tile attention (STA). The grid is cut into tiles of
  (frames, rows, columns); the query's tile attends a window of `window` tiles per axis, centred on
  it and shifted inwards at the grid's edges. With `reorder=True` the kernel sees the tokens tile
  after tile (`TileOrder`): a tile of `block` tokens is one block and the window is whole blocks.
- `spatial(frame_radius)`: the frames within +- frame_radius, whole (Sparse VideoGen's spatial head,
  `tiles` with one tile per frame).
- `skip`: nothing attended, the head outputs zero (the residual carries it). `full`: dense.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparta.attention.layout import BlockLayout, TokenOrder, invert_permutation


@dataclass(frozen=True)
class VideoGrid:
    """Token geometry of a video DiT sequence: `text` text tokens, then frames x height x width."""

    frames: int
    height: int
    width: int
    text: int = 0

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.text, int) or isinstance(self.text, bool) or self.text < 0:
            raise ValueError(f"text: expected an int >= 0, got {self.text!r}")

    @property
    def frame_size(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.text + self.frames * self.frame_size

    def coords(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frame, row, column) of each video token, int64 [frames * height * width], raster order."""
        index = torch.arange(self.frames * self.frame_size, device=device)
        return index // self.frame_size, index % self.frame_size // self.width, index % self.width

    def frame_keys(self, frame: int = 0) -> tuple[tuple[int, int], ...]:
        """Token range [start, end) of one frame, as `stripe` keys."""
        start = self.text + frame * self.frame_size
        return ((start, start + self.frame_size),)


@dataclass(frozen=True)
class TileOrder:
    """Tile-major token order, a `TokenOrder` for `BlockLayout.order`.

    The kernel sees the whole tiles first (tile after tile in raster order over the tile grid, tokens
    in raster order inside a tile), then the smaller edge tiles of a grid that the tile does not
    divide, then the text tokens. With tiles of `block` tokens every whole tile is exactly one block,
    so a window of whole tiles is a set of whole blocks; only the edge tiles share blocks.
    """

    grid: VideoGrid
    tile: tuple[int, int, int]

    def permutation(self, device: torch.device | str | None = None) -> torch.Tensor:
        return _tile_permutation(self.grid, self.tile, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=32)
def _tile_permutation(grid: VideoGrid, tile: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    tile_ids = _tile_ids(grid, tile, device)
    video_tokens = tile_ids.numel()
    edge = torch.bincount(tile_ids)[tile_ids] < tile[0] * tile[1] * tile[2]
    rank = (edge.long() * video_tokens + tile_ids) * video_tokens + torch.arange(video_tokens, device=device)
    video = grid.text + torch.argsort(rank)  # whole tiles, then edge tiles; raster inside each tile
    return torch.cat([video, torch.arange(grid.text, device=device)])


def _tile_ids(grid: VideoGrid, tile: tuple[int, int, int], device) -> torch.Tensor:
    """Tile index (raster over the tile grid) of each video token."""
    f, h, w = grid.coords(device)
    tiles_h, tiles_w = _cdiv(grid.height, tile[1]), _cdiv(grid.width, tile[2])
    return (f // tile[0] * tiles_h + h // tile[1]) * tiles_w + w // tile[2]


@dataclass(frozen=True)
class RelativeOrder:
    """A layout's token order `order` (None: raster) as seen from tokens already in `model` order.

    Kernel position t holds raster token order[t], which the model keeps at position
    inverse(model)[order[t]].
    """

    model: TokenOrder
    order: TokenOrder | None

    def permutation(self, device: torch.device | str | None = None) -> torch.Tensor:
        to_model = invert_permutation(self.model.permutation(device))
        return to_model if self.order is None else to_model[self.order.permutation(device)]


def in_token_order(layout: BlockLayout, token_order: TokenOrder | None) -> BlockLayout:
    """`layout`, built for raster tokens, for a model whose tokens are in `token_order` (None: raster).

    The block mask stays as built; only the order the kernel needs its tokens in changes: none when
    the layout's order is the model's (tile-major tokens under their own tiles) or when the order
    cannot matter (all blocks or none: full, skip), else the composition.
    """
    if token_order is None:
        return layout
    in_place = layout.order == token_order or not layout.mask.any() or bool(layout.mask.all())
    order = None if in_place else RelativeOrder(token_order, layout.order)
    return BlockLayout(layout.mask, layout.seqlen_q, layout.seqlen_k, layout.block_q, layout.block_k, order)


def diagonal(grid: VideoGrid, width: int, *, block: int = 128, device=None) -> BlockLayout:
    return multi_diagonal(grid, width, frame_radius=0, block=block, device=device)


def multi_diagonal(grid: VideoGrid, width: int, frame_radius: int | None = 1, *, block: int = 128,
                   device=None) -> BlockLayout:
    """Bands at offsets m * frame_size, |m| <= frame_radius (None: all frames), half-width `width`."""
    _check_int("width", width, minimum=0)
    if frame_radius is None:
        frame_radius = grid.frames - 1
    _check_int("frame_radius", frame_radius, minimum=0)
    start, last = _block_token_ranges(grid.tokens, block, device)
    # Video index range [lo, hi] of each block (empty, lo > hi, for blocks of text only).
    lo, hi = (start - grid.text).clamp(min=0), last - grid.text
    has_video = lo <= hi
    # Raster differences i - j over a block pair span [d_lo, d_hi]; a band m is hit iff
    # m * frame_size lies in [d_lo - width, d_hi + width].
    d_lo, d_hi = lo[:, None] - hi[None, :], hi[:, None] - lo[None, :]
    frame_size = grid.frame_size
    m_lo = -torch.div(width - d_lo, frame_size, rounding_mode="floor")  # ceil((d_lo - width) / F)
    m_hi = torch.div(d_hi + width, frame_size, rounding_mode="floor")
    hit = m_lo.clamp(min=-frame_radius) <= m_hi.clamp(max=frame_radius)
    return _layout(grid, hit & has_video[:, None] & has_video[None, :], block)


def temporal(grid: VideoGrid, width: int = 0, *, block: int = 128, device=None) -> BlockLayout:
    return multi_diagonal(grid, width, frame_radius=None, block=block, device=device)


def stripe(grid: VideoGrid, keys: Sequence[Sequence[int]], *, block: int = 128, device=None) -> BlockLayout:
    """Every query attends the key tokens in the ranges `keys` = ((start, end), ...)."""
    if not keys:
        raise ValueError("keys: expected at least one (start, end) token range")
    key_blocks = torch.zeros(_cdiv(grid.tokens, block), dtype=torch.bool, device=device)
    for key_range in keys:
        if len(key_range) != 2 or not 0 <= key_range[0] < key_range[1] <= grid.tokens:
            raise ValueError(f"keys: expected ranges (start, end) with 0 <= start < end <= {grid.tokens}, "
                             f"got {tuple(key_range)}")
        key_blocks[key_range[0] // block: (key_range[1] - 1) // block + 1] = True
    return _layout(grid, key_blocks[None, :].expand(key_blocks.numel(), -1), block)


def tiles(grid: VideoGrid, tile: Sequence[int], window: Sequence[int], reorder: bool = True, *,
          block: int = 128, device=None) -> BlockLayout:
    """Sliding tile attention; `window` counts tiles per axis (clipped to the tile grid)."""
    tile, window = _check_triple("tile", tile), _check_triple("window", window)
    counts = [_cdiv(size, t) for size, t in zip((grid.frames, grid.height, grid.width), tile)]
    per_axis = [_window_mask(n, min(w, n), device) for n, w in zip(counts, window)]
    allowed = (per_axis[0][:, None, None, :, None, None] & per_axis[1][None, :, None, None, :, None]
               & per_axis[2][None, None, :, None, None, :])
    cells = counts[0] * counts[1] * counts[2]
    order = TileOrder(grid, tile) if reorder else None
    return _cell_cover(grid, _tile_ids(grid, tile, device), allowed.reshape(cells, cells), block, order)


def spatial(grid: VideoGrid, frame_radius: int = 0, *, block: int = 128, device=None) -> BlockLayout:
    _check_int("frame_radius", frame_radius, minimum=0)
    return tiles(grid, (1, grid.height, grid.width), (2 * frame_radius + 1, 1, 1), reorder=False,
                 block=block, device=device)


def full(grid: VideoGrid, *, block: int = 128, device=None) -> BlockLayout:
    return BlockLayout.full(1, grid.tokens, block_q=block, block_k=block, device=device)


def skip(grid: VideoGrid, *, block: int = 128, device=None) -> BlockLayout:
    blocks = _cdiv(grid.tokens, block)
    mask = torch.zeros(1, 1, blocks, blocks, dtype=torch.bool, device=device)
    return BlockLayout(mask, grid.tokens, grid.tokens, block, block)


PATTERNS: dict[str, Callable[..., BlockLayout]] = {
    "full": full, "skip": skip, "diagonal": diagonal, "multi_diagonal": multi_diagonal,
    "temporal": temporal, "stripe": stripe, "tiles": tiles, "spatial": spatial,
}


@dataclass(frozen=True)
class Pattern:
    """A named pattern with its parameters: one head's entry in a plan. Hashable (params are tuples)."""

    name: str
    params: tuple[tuple[str, object], ...] = ()

    @staticmethod
    def of(name: str, **params) -> Pattern:
        if name not in PATTERNS:
            raise ValueError(f"pattern: unknown name {name!r}, expected one of {sorted(PATTERNS)}")
        return Pattern(name, tuple(sorted((key, _freeze(value)) for key, value in params.items())))

    def build(self, grid: VideoGrid, *, block: int = 128, device=None,
              token_order: TokenOrder | None = None) -> BlockLayout:
        """The one-head layout for a model whose tokens are in `token_order` (None: raster)."""
        try:
            layout = PATTERNS[self.name](grid, block=block, device=device, **dict(self.params))
        except TypeError as error:  # a parameter the builder does not take
            raise ValueError(f"params: {self}: {error}") from None
        return in_token_order(layout, token_order)

    def to_dict(self) -> dict:
        return {"pattern": self.name, "params": {key: _thaw(value) for key, value in self.params}}

    @staticmethod
    def from_dict(entry: dict) -> Pattern:
        if not isinstance(entry, dict) or "pattern" not in entry:
            raise ValueError(f"pattern: expected a mapping with a 'pattern' key, got {entry!r}")
        return Pattern.of(entry["pattern"], **(entry.get("params") or {}))

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{key}={_thaw(value)}' for key, value in self.params)})"


def _layout(grid: VideoGrid, mask: torch.Tensor, block: int, order: TileOrder | None = None) -> BlockLayout:
    """One-head layout from a [Qb, Kb] video mask, with the blocks holding text made global."""
    is_text = torch.arange(grid.tokens, device=mask.device) < grid.text
    if order is not None:
        is_text = is_text[order.permutation(mask.device)]
    blocks = _cdiv(grid.tokens, block)
    text_block = torch.zeros(blocks, device=mask.device).index_add_(
        0, torch.arange(grid.tokens, device=mask.device) // block, is_text.float()) > 0
    mask = mask | text_block[:, None] | text_block[None, :]
    return BlockLayout(mask[None, None], grid.tokens, grid.tokens, block, block, order)


def _cell_cover(grid: VideoGrid, cell_of_video: torch.Tensor, allowed: torch.Tensor, block: int,
                order: TileOrder | None) -> BlockLayout:
    """Block cover of "token i attends token j iff allowed[cell(i), cell(j)]".

    incidence[b, c] says whether block b holds a token of cell c; a block pair is attended iff some
    cell pair it holds is allowed: (incidence @ allowed @ incidence^T) > 0.
    """
    device, cells = cell_of_video.device, allowed.shape[0]
    # Text tokens go to an extra cell that allows nothing; `_layout` makes text global afterwards.
    cell = torch.cat([torch.full((grid.text,), cells, device=device), cell_of_video])
    if order is not None:
        cell = cell[order.permutation(device)]
    incidence = torch.zeros(_cdiv(grid.tokens, block), cells + 1, device=device)
    incidence[torch.arange(grid.tokens, device=device) // block, cell] = 1.0
    allowed = torch.nn.functional.pad(allowed.float(), (0, 1, 0, 1))
    hit = incidence @ allowed @ incidence.T > 0
    return _layout(grid, hit, block, order)


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    """allowed[a, b]: tile b is in the window of tile a (start clamped so the window stays inside)."""
    index = torch.arange(n, device=device)
    start = (index - (window - 1) // 2).clamp(0, n - window)
    return (index[None, :] >= start[:, None]) & (index[None, :] < start[:, None] + window)


def _block_token_ranges(tokens: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(_cdiv(tokens, block), device=device) * block
    return start, (start + block).clamp(max=tokens) - 1


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_triple(name: str, value) -> tuple[int, int, int]:
    if len(value) != 3:
        raise ValueError(f"{name}: expected (frames, rows, columns), got {value!r}")
    for item in value:
        _check_int(name, item, minimum=1)
    return tuple(value)


def _freeze(value):
    return tuple(_freeze(item) for item in value) if isinstance(value, (list, tuple)) else value


def _thaw(value):
    return [_thaw(item) for item in value] if isinstance(value, tuple) else value


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
