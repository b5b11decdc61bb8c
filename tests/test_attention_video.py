"""Video patterns: the exact token pairs against hand-written per-pair definitions, densities,
the tile-major order and its inverse."""

import itertools
import math

import pytest
import torch

from sparta.attention import (
    Pattern,
    TileOrder,
    VideoGrid,
    invert_permutation,
    video,
)

# ---- the definitions, written per token pair on model token indices ------------------------------

def coords(grid, token):
    v = token - grid.text
    return v // (grid.height * grid.width), v % (grid.height * grid.width) // grid.width, v % grid.width


def text_is_global(grid, i, j):
    return i < grid.text or j < grid.text


def diagonal_pair(grid, i, j, width):
    return text_is_global(grid, i, j) or abs(i - j) <= width


def multi_diagonal_pair(grid, i, j, width, frame_radius):
    if text_is_global(grid, i, j):
        return True
    frame = grid.height * grid.width
    return any(abs(i - j - m * frame) <= width for m in range(-frame_radius, frame_radius + 1))


def stripe_pair(grid, i, j, keys):
    return text_is_global(grid, i, j) or any(start <= j < end for start, end in keys)


def in_clamped_window(a, b, count, window):
    """STA: the window of `window` tiles is centred on tile a, shifted to stay inside 0..count-1."""
    window = min(window, count)
    start = min(max(a - (window - 1) // 2, 0), count - window)
    return start <= b < start + window


def tiles_pair(grid, i, j, tile, window):
    if text_is_global(grid, i, j):
        return True
    sizes = (grid.frames, grid.height, grid.width)
    return all(in_clamped_window(ci // t, cj // t, -(-size // t), w)
               for ci, cj, t, size, w in zip(coords(grid, i), coords(grid, j), tile, sizes, window))


def spatial_pair(grid, i, j, frame_radius):
    if text_is_global(grid, i, j):
        return True
    return in_clamped_window(coords(grid, i)[0], coords(grid, j)[0], grid.frames, 2 * frame_radius + 1)


def expected_blocks(grid, layout, pair):
    """Block cover in the kernel's token order: a block pair is in iff some token pair in it is."""
    tokens, block = grid.tokens, layout.block_q
    model_token = layout.order.permutation().tolist() if layout.order is not None else list(range(tokens))
    blocks = -(-tokens // block)
    mask = torch.zeros(blocks, blocks, dtype=torch.bool)
    for p, r in itertools.product(range(tokens), repeat=2):
        if not mask[p // block, r // block] and pair(model_token[p], model_token[r]):
            mask[p // block, r // block] = True
    return mask


GRIDS = [VideoGrid(3, 4, 6, text=5), VideoGrid(2, 5, 7)]

CASES = [
    ("diagonal", dict(width=0), lambda g, i, j: diagonal_pair(g, i, j, 0)),
    ("diagonal", dict(width=9), lambda g, i, j: diagonal_pair(g, i, j, 9)),
    ("multi_diagonal", dict(width=2, frame_radius=1), lambda g, i, j: multi_diagonal_pair(g, i, j, 2, 1)),
    ("temporal", dict(width=1), lambda g, i, j: multi_diagonal_pair(g, i, j, 1, g.frames - 1)),
    ("stripe", dict(keys=((7, 12), (30, 31))), lambda g, i, j: stripe_pair(g, i, j, ((7, 12), (30, 31)))),
    ("tiles", dict(tile=(1, 2, 3), window=(3, 1, 3)), lambda g, i, j: tiles_pair(g, i, j, (1, 2, 3), (3, 1, 3))),
    ("tiles", dict(tile=(2, 2, 2), window=(1, 3, 3), reorder=False),
     lambda g, i, j: tiles_pair(g, i, j, (2, 2, 2), (1, 3, 3))),
    ("spatial", dict(frame_radius=0), lambda g, i, j: spatial_pair(g, i, j, 0)),
    ("full", dict(), lambda g, i, j: True),
    ("skip", dict(), lambda g, i, j: False),
]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("name, params, pair", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_pattern_blocks_are_the_cover_of_the_definition(grid, name, params, pair):
    layout = Pattern.of(name, **params).build(grid, block=8)
    assert layout.mask.shape == (1, 1, -(-grid.tokens // 8), -(-grid.tokens // 8))
    expected = expected_blocks(grid, layout, lambda i, j: pair(grid, i, j))
    assert torch.equal(layout.mask[0, 0], expected)
    # Every pair of the definition is attended (the cover never drops one), in model order.
    elements = layout.element_mask()[0, 0]
    defined = torch.tensor([[pair(grid, i, j) for j in range(grid.tokens)] for i in range(grid.tokens)])
    assert not (defined & ~elements).any()


def test_tiles_of_one_block_each_are_exact_whole_blocks():
    """With tiles that divide the grid and hold `block` tokens, the window is whole blocks: the
    attended token pairs are exactly the definition's and the density is the window's share."""
    grid = VideoGrid(4, 4, 8)
    tile, window = (1, 2, 4), (3, 1, 1)  # tile grid 4 x 2 x 2, one tile = 8 tokens = one block
    layout = video.tiles(grid, tile, window, block=8)
    defined = torch.tensor([[tiles_pair(grid, i, j, tile, window) for j in range(grid.tokens)]
                            for i in range(grid.tokens)])
    assert torch.equal(layout.element_mask()[0, 0], defined)
    assert layout.density().item() == pytest.approx(3 / 16)


@pytest.mark.parametrize("grid, tile", [(VideoGrid(3, 4, 6, text=5), (2, 3, 4)), (VideoGrid(2, 4, 4), (1, 2, 2))])
def test_tile_order_is_tile_major_and_inverts_exactly(grid, tile):
    perm = TileOrder(grid, tile).permutation()
    assert sorted(perm.tolist()) == list(range(grid.tokens))  # a permutation
    x = torch.randn(2, grid.tokens, 3)
    assert torch.equal(x[:, perm][:, invert_permutation(perm)], x)
    # Kernel order: whole tiles (by tile index), then edge tiles, then the text; raster inside a tile.
    sizes = (grid.frames, grid.height, grid.width)
    counts = [-(-s // t) for s, t in zip(sizes, tile)]

    def tile_of(token):
        f, h, w = coords(grid, token)
        return (f // tile[0] * counts[1] + h // tile[1]) * counts[2] + w // tile[2]

    volume = math.prod(tile)
    members = {}
    for token in range(grid.text, grid.tokens):
        members.setdefault(tile_of(token), []).append(token)
    whole = [t for t in sorted(members) if len(members[t]) == volume]
    edge = [t for t in sorted(members) if len(members[t]) < volume]
    expected = [token for t in whole + edge for token in members[t]] + list(range(grid.text))
    assert perm.tolist() == expected


@pytest.mark.parametrize("width_blocks", [0, 1, 3])
def test_diagonal_density_matches_its_width(width_blocks):
    grid, block = VideoGrid(4, 4, 8), 8  # 128 tokens = 16 blocks
    layout = video.diagonal(grid, width=width_blocks * block, block=block)
    n, k = 16, width_blocks  # blocks within k of the diagonal
    assert layout.density().item() == pytest.approx((n * (2 * k + 1) - k * (k + 1)) / n ** 2)


def test_other_densities_match_their_parameters():
    grid, block = VideoGrid(5, 4, 8), 16  # frame = 32 tokens = 2 blocks, 10 blocks in all
    assert video.stripe(grid, grid.frame_keys(0), block=block).density().item() == pytest.approx(2 / 10)
    for radius in (0, 1, 2, 4):
        frames = min(2 * radius + 1, 5)
        assert video.spatial(grid, radius, block=block).density().item() == pytest.approx(frames / 5)
    tiled = video.tiles(VideoGrid(4, 4, 8), (1, 2, 8), (3, 3, 1), block=16)  # tile grid 4 x 2 x 1
    assert tiled.density().item() == pytest.approx((3 * 2 * 1) / (4 * 2 * 1))
    assert video.skip(grid, block=block).density().item() == 0.0
    assert video.full(grid, block=block).density().item() == 1.0


def test_pattern_spec_round_trips_through_a_dict():
    pattern = Pattern.of("tiles", tile=[1, 2, 4], window=(3, 3, 3))
    assert Pattern.from_dict(pattern.to_dict()) == pattern
    assert pattern.to_dict() == {"pattern": "tiles", "params": {"tile": [1, 2, 4], "window": [3, 3, 3]}}


@pytest.mark.parametrize("call, argument", [
    (lambda: VideoGrid(0, 4, 4), "frames"),
    (lambda: VideoGrid(2, 4, 4, text=-1), "text"),
    (lambda: video.diagonal(VideoGrid(2, 4, 4), width=-1), "width"),
    (lambda: video.multi_diagonal(VideoGrid(2, 4, 4), width=1, frame_radius=-2), "frame_radius"),
    (lambda: video.tiles(VideoGrid(2, 4, 4), (1, 2), (1, 1, 1)), "tile"),
    (lambda: video.tiles(VideoGrid(2, 4, 4), (1, 2, 2), (1, 0, 1)), "window"),
    (lambda: video.stripe(VideoGrid(2, 4, 4), ((10, 40),)), "keys"),
    (lambda: Pattern.of("hexagonal"), "pattern"),
    (lambda: Pattern.of("diagonal", radius=3).build(VideoGrid(2, 4, 4)), "params"),
    (lambda: Pattern.from_dict({"params": {}}), "pattern"),
])
def test_bad_pattern_input_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# ---- patterns for a model whose tokens are in another order --------------------------------------

@pytest.mark.parametrize("name, params, pair", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_pattern_built_for_a_token_order_is_the_cover_in_that_order_and_runs_in_place(name, params, pair):
    """Every pattern, tiles of another shape included, is cut in the model's order: the kernel gets the
    model's tokens as they are, and the blocks are the cover of the definition in that order."""
    grid = VideoGrid(3, 4, 6, text=5)  # edge tiles and text: the model order moves the text to the end
    model_order = TileOrder(grid, (2, 2, 4))
    built = Pattern.of(name, **params).build(grid, block=8, token_order=model_order)
    assert built.order is None
    to_raster = model_order.permutation().tolist()  # model token t is raster token to_raster[t]
    blocks = -(-grid.tokens // 8)
    expected = torch.zeros(blocks, blocks, dtype=torch.bool)
    for p, r in itertools.product(range(grid.tokens), repeat=2):
        if not expected[p // 8, r // 8] and pair(grid, to_raster[p], to_raster[r]):
            expected[p // 8, r // 8] = True
    assert torch.equal(built.mask[0, 0], expected)


def test_temporal_heads_are_sparser_in_the_models_tile_order():
    """Why cutting in the model's order can pay: a frame of 30 tokens is not whole blocks of 8 in raster
    order, so a block's partners in the other frames straddle two blocks; a tile's partners are tiles."""
    grid = VideoGrid(4, 5, 6)
    in_tiles = video.temporal(grid, width=0, block=8, order=TileOrder(grid, (1, 2, 4)))
    raster = video.temporal(grid, width=0, block=8)
    assert in_tiles.density().item() < raster.density().item()
