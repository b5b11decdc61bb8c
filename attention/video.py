"""Attention patterns of video diffusion transformers on a (frames, height, width) latent grid.

Token order: patterns are defined on raster tokens (`text` text tokens first, then the video tokens
in raster order: frame, row, column). Every builder takes the model's token order (`order`, None:
raster) and cuts its blocks in it, so the layout runs on the model's tokens as they are: a video
DiT that keeps its tokens in tile-major order (`TileOrder`) gets the block cover of each pattern in
that order and no attention call permutes tokens. Only `tiles(reorder=True)` in a raster model
(sliding tile attention on raster tokens) hands the kernel its tokens in its own tile order.
Text is global in every pattern except `skip`: text queries attend every key and every query
attends the text keys. Each builder returns a one-head `BlockLayout` whose blocks are the block
cover of the pattern's token pairs in the order they are cut in (a block pair is attended iff some
token pair in it is):

- `diagonal(width)`: video token i attends video token j iff |i - j| <= width (raster distance).
- `multi_diagonal(width, frame_radius)`: |i - j - m * frame_size| <= width for some frame offset
  |m| <= frame_radius: the same spatial position (+- width) in the neighbouring frames.
- `temporal(width)`: `multi_diagonal` over all frames (Sparse VideoGen's temporal head).
- `stripe(keys)`: every query attends the key token ranges `keys` (text, first frame, sinks).
- `tiles(tile, window)`: sliding tile attention (STA). The grid is cut into tiles of
  (frames, rows, columns); the query's tile attends a window of `window` tiles per axis, centred on
  it and shifted inwards at the grid's edges. In a raster model with `reorder=True` the kernel sees
  the tokens tile after tile (`TileOrder`): a tile of `block` tokens is one block and the window is
  whole blocks (as it is in a model whose own order is that tile order).
- `spatial(frame_radius)`: the frames within +- frame_radius, whole (Sparse VideoGen's spatial head,
  `tiles` with one tile per frame).
- `skip`: nothing attended, the head outputs zero (the residual carries it). `full`: dense.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparta.attention.layout import BlockLayout, TokenOrder


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


def diagonal(grid: VideoGrid, width: int, *, block: int = 128, device=None,
             order: TokenOrder | None = None) -> BlockLayout:
    return multi_diagonal(grid, width, frame_radius=0, block=block, device=device, order=order)


def multi_diagonal(grid: VideoGrid, width: int, frame_radius: int | None = 1, *, block: int = 128,
                   device=None, order: TokenOrder | None = None) -> BlockLayout:
    """Bands at offsets m * frame_size, |m| <= frame_radius (None: all frames), half-width `width`.

    Cut in any order: `reach[b, i]` says whether some video token j of key block b has i within
    a band (i = j + m * frame_size + d, |d| <= width), and a block pair is attended iff the query
    block holds such an i: holds @ reach^T > 0.
    """
    _check_int("width", width, minimum=0)
    if frame_radius is None:
        frame_radius = grid.frames - 1
    _check_int("frame_radius", frame_radius, minimum=0)
    holds = _video_incidence(grid, block, order, device)
    # On positions padded by `width` each side, so that no step drops a position the next brings back:
    # widen each held position to +- width (a window sum over prefix sums), then shift by the bands.
    padded = torch.nn.functional.pad(holds, (width, width))
    positions = padded.shape[1]
    prefix = torch.nn.functional.pad(padded.cumsum(dim=1, dtype=torch.int32), (1, 0))
    index = torch.arange(positions, device=holds.device)
    widened = (prefix[:, (index + width + 1).clamp(max=positions)] - prefix[:, (index - width).clamp(min=0)]) > 0
    reach = torch.zeros_like(widened)
    for offset in range(-frame_radius, frame_radius + 1):
        shift = offset * grid.frame_size
        if abs(shift) >= positions:
            continue
        if shift >= 0:
            reach[:, shift:] |= widened[:, :positions - shift]
        else:
            reach[:, :positions + shift] |= widened[:, -shift:]
    reach = reach[:, width:width + holds.shape[1]]
    hit = holds.float() @ reach.float().T > 0
    return _layout(grid, hit, block, order)


def temporal(grid: VideoGrid, width: int = 0, *, block: int = 128, device=None,
             order: TokenOrder | None = None) -> BlockLayout:
    return multi_diagonal(grid, width, frame_radius=None, block=block, device=device, order=order)


def stripe(grid: VideoGrid, keys: Sequence[Sequence[int]], *, block: int = 128, device=None,
           order: TokenOrder | None = None) -> BlockLayout:
    """Every query attends the key tokens in the (raster) ranges `keys` = ((start, end), ...)."""
    if not keys:
        raise ValueError("keys: expected at least one (start, end) token range")
    is_key = torch.zeros(grid.tokens, dtype=torch.bool, device=device)
    for key_range in keys:
        if len(key_range) != 2 or not 0 <= key_range[0] < key_range[1] <= grid.tokens:
            raise ValueError(f"keys: expected ranges (start, end) with 0 <= start < end <= {grid.tokens}, "
                             f"got {tuple(key_range)}")
        is_key[key_range[0]:key_range[1]] = True
    if order is not None:
        is_key = is_key[order.permutation(device)]
    key_blocks = _any_per_block(is_key, block)
    return _layout(grid, key_blocks[None, :].expand(key_blocks.numel(), -1), block, order)


def tiles(grid: VideoGrid, tile: Sequence[int], window: Sequence[int], reorder: bool = True, *,
          block: int = 128, device=None, order: TokenOrder | None = None) -> BlockLayout:
    """Sliding tile attention; `window` counts tiles per axis (clipped to the tile grid). `reorder`
    matters in a raster model only (`order=None`): the kernel then sees the tokens in this tile order."""
    tile, window = _check_triple("tile", tile), _check_triple("window", window)
    counts = [_cdiv(size, t) for size, t in zip((grid.frames, grid.height, grid.width), tile)]
    per_axis = [_window_mask(n, min(w, n), device) for n, w in zip(counts, window)]
    allowed = (per_axis[0][:, None, None, :, None, None] & per_axis[1][None, :, None, None, :, None]
               & per_axis[2][None, None, :, None, None, :])
    cells = counts[0] * counts[1] * counts[2]
    kernel_order = TileOrder(grid, tile) if reorder and order is None else None
    return _cell_cover(grid, _tile_ids(grid, tile, device), allowed.reshape(cells, cells), block,
                       kernel_order if order is None else order, kernel_order)


def spatial(grid: VideoGrid, frame_radius: int = 0, *, block: int = 128, device=None,
            order: TokenOrder | None = None) -> BlockLayout:
    _check_int("frame_radius", frame_radius, minimum=0)
    return tiles(grid, (1, grid.height, grid.width), (2 * frame_radius + 1, 1, 1), reorder=False,
                 block=block, device=device, order=order)


def full(grid: VideoGrid, *, block: int = 128, device=None, order: TokenOrder | None = None) -> BlockLayout:
    return BlockLayout.full(1, grid.tokens, block_q=block, block_k=block, device=device)


def skip(grid: VideoGrid, *, block: int = 128, device=None, order: TokenOrder | None = None) -> BlockLayout:
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
        """The one-head layout for a model whose tokens are in `token_order` (None: raster), cut in that order."""
        try:
            return PATTERNS[self.name](grid, block=block, device=device, order=token_order, **dict(self.params))
        except TypeError as error:  # a parameter the builder does not take
            raise ValueError(f"params: {self}: {error}") from None

    def to_dict(self) -> dict:
        return {"pattern": self.name, "params": {key: _thaw(value) for key, value in self.params}}

    @staticmethod
    def from_dict(entry: dict) -> Pattern:
        if not isinstance(entry, dict) or "pattern" not in entry:
            raise ValueError(f"pattern: expected a mapping with a 'pattern' key, got {entry!r}")
        return Pattern.of(entry["pattern"], **(entry.get("params") or {}))

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{key}={_thaw(value)}' for key, value in self.params)})"


def _layout(grid: VideoGrid, mask: torch.Tensor, block: int, order: TokenOrder | None,
            kernel_order: TokenOrder | None = None) -> BlockLayout:
    """One-head layout from a [Qb, Kb] video mask cut in `order` (None: raster), with the blocks holding
    text made global. `kernel_order`: the order the kernel needs the model's tokens in (None: as they are)."""
    is_text = torch.arange(grid.tokens, device=mask.device) < grid.text
    if order is not None:
        is_text = is_text[order.permutation(mask.device)]
    text_block = _any_per_block(is_text, block)
    mask = mask | text_block[:, None] | text_block[None, :]
    return BlockLayout(mask[None, None], grid.tokens, grid.tokens, block, block, kernel_order)


def _cell_cover(grid: VideoGrid, cell_of_video: torch.Tensor, allowed: torch.Tensor, block: int,
                order: TokenOrder | None, kernel_order: TokenOrder | None = None) -> BlockLayout:
    """Block cover in `order` of "token i attends token j iff allowed[cell(i), cell(j)]".

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
    return _layout(grid, hit, block, order, kernel_order)


def _video_incidence(grid: VideoGrid, block: int, order: TokenOrder | None, device) -> torch.Tensor:
    """bool [blocks, video tokens]: block b (cut in `order`) holds video token p (raster video index)."""
    raster = torch.arange(grid.tokens, device=device) if order is None else order.permutation(device)
    is_video = raster >= grid.text
    holds = torch.zeros(_cdiv(grid.tokens, block), grid.tokens - grid.text, dtype=torch.bool, device=device)
    holds[(torch.arange(grid.tokens, device=device) // block)[is_video], raster[is_video] - grid.text] = True
    return holds


def _any_per_block(flags: torch.Tensor, block: int) -> torch.Tensor:
    """bool [blocks]: some token of the block is flagged."""
    return torch.zeros(_cdiv(flags.numel(), block), device=flags.device).index_add_(
        0, torch.arange(flags.numel(), device=flags.device) // block, flags.float()) > 0


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    """allowed[a, b]: tile b is in the window of tile a (start clamped so the window stays inside)."""
    index = torch.arange(n, device=device)
    start = (index - (window - 1) // 2).clamp(0, n - window)
    return (index[None, :] >= start[:, None]) & (index[None, :] < start[:, None] + window)


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
