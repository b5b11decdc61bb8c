"""Offline pattern search (Sparse-vDiT) and the plans it writes.

1. Capture: run the model densely on a few calibration inputs (samples x timesteps) inside
   `capture_qkv(model, search.observe)`; every SparseAttention layer hands its q, k, v over.
2. Evaluate: for each layer, every candidate pattern runs on all heads at once; the squared error
   of each head's output against dense attention is summed over the calibration calls.
3. Choose, per layer and head, the candidate minimising

       MSE(out_sparse, out_dense) / MSE-scale  +  lam * (1 - S)

   where MSE-scale is the mean square of the layer's dense output (so an all-zero head costs
   nothing to skip) and 1 - S is the candidate's attention time relative to dense cuDNN attention,
   from `CostModel` (kernel times measured on the device, FLOP model as fallback).
4. Write a `Plan` (YAML, layer -> head -> pattern + params). A loaded plan is a layout provider:
   heads that share a token order run as ONE kernel call with per-head masks (head fusion); skipped
   heads cost nothing.

Patterns are defined on raster tokens. For a model whose tokens are in another order (a video DiT's
`TileOrder`), search and plan take `token_order`: q, k, v come in that order, and each pattern is
cut in it (`Pattern.build(..., token_order=)`), so every head of a layer runs in ONE kernel call on
the tokens as they are, and the search weighs each pattern's density in that order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from sparta.attention.layout import BlockLayout, HeadGroup
from sparta.attention.module import SparseAttentionCore, attend
from sparta.attention.selection import attention_block_mass
from sparta.attention.video import Pattern, TileOrder, VideoGrid

COST_TABLE = Path(__file__).with_name("pattern_costs.json")


class CostModel:
    """Attention time of a pattern at a block density, relative to dense cuDNN attention (= 1).

    `table` maps a pattern name to measured (density, relative time) points, interpolated linearly
    (clamped below the first point, proportional above the last). Patterns not in the table use the
    FLOP model: relative time = density. `skip` costs 0 (a head without blocks is never computed).
    """

    def __init__(self, table: dict[str, Sequence[Sequence[float]]] | None = None):
        self.table = {name: sorted((float(d), float(t)) for d, t in points) for name, points in (table or {}).items()}
        for name, points in self.table.items():
            if not points:
                raise ValueError(f"table: pattern {name!r} has no (density, time) points")

    @classmethod
    def load(cls, path: str | Path = COST_TABLE) -> CostModel:
        """The measured table (benchmarks/patterns.py writes it); the FLOP model if there is none."""
        path = Path(path)
        if not path.exists():
            return cls()
        return cls(json.loads(path.read_text())["relative_time"])

    def relative_cost(self, pattern: str, density: float) -> float:
        if pattern == "skip":
            return 0.0
        points = self.table.get(pattern)
        if points is None:
            return density
        densities, times = zip(*points)
        if density > densities[-1]:
            return times[-1] * density / densities[-1]
        return float(np.interp(density, densities, times))


def default_tile(grid: VideoGrid, block: int) -> tuple[int, int, int]:
    """One frame deep, rows x columns a power-of-two split of `block` with the grid's aspect ratio."""
    splits = [(2 ** i, block // 2 ** i) for i in range(block.bit_length()) if block % 2 ** i == 0]
    aspect = grid.height / grid.width
    rows, columns = min(splits, key=lambda s: (abs(np.log(s[0] / s[1]) - np.log(aspect)), -s[0]))
    return 1, rows, columns


def video_candidates(grid: VideoGrid, *, block: int = 128, tile: Sequence[int] | None = None) -> list[Pattern]:
    """A default sweep of every static pattern family over a few densities."""
    frame, row = grid.frame_size, grid.width
    tile = tuple(tile) if tile is not None else default_tile(grid, block)
    tile_counts = [-(-size // t) for size, t in zip((grid.frames, grid.height, grid.width), tile)]
    windows = {tuple(min(w, n) for w, n in zip(window, tile_counts))
               for window in ((1, 1, 1), (3, 1, 1), (grid.frames, 1, 1), (1, 3, 3), (3, 3, 3), (5, 3, 3),
                              (3, 5, 5), (5, 5, 5))}
    candidates = [Pattern.of("full"), Pattern.of("skip")]
    candidates += [Pattern.of("diagonal", width=w) for w in sorted({max(1, frame * n // 16) for n in (1, 2, 4, 8, 16)})]
    candidates += [Pattern.of("multi_diagonal", width=w, frame_radius=1) for w in sorted({row, 2 * row, frame // 4})]
    candidates += [Pattern.of("temporal", width=w) for w in sorted({0, row // 2, row, 2 * row})]
    candidates += [Pattern.of("spatial", frame_radius=r) for r in range(min(3, grid.frames))]
    candidates += [Pattern.of("tiles", tile=tile, window=w) for w in sorted(windows)]
    candidates += [Pattern.of("stripe", keys=grid.frame_keys(0))]
    if grid.text:
        candidates.append(Pattern.of("stripe", keys=((0, grid.text),)))
    return candidates


SCORE_TIE = 1e-9  # scores this close are equal (error sums in fp64 over different kernels)
STAT_KEYS = ("rel_mse", "cost", "density")  # what the search records of each head's choice


@dataclass
class Plan:
    """Per-layer, per-head patterns for a video grid; a layout provider once loaded.

    `stats` (optional, from the search): per layer, per head {rel_mse, cost, density} of the choice.
    `token_order`: the order of the model's tokens (None: raster), saved as its tile.
    """

    grid: VideoGrid
    block: int
    layers: dict[int, list[Pattern]]
    stats: dict[int, list[dict]] = field(default_factory=dict)
    token_order: TileOrder | None = None
    _groups: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, layer: int) -> list[HeadGroup]:
        if layer not in self.layers:
            raise ValueError(f"layer: the plan has layers {sorted(self.layers)}, not {layer}")
        if q.shape[1] != len(self.layers[layer]):
            raise ValueError(f"q: {q.shape[1]} heads, the plan's layer {layer} has {len(self.layers[layer])}")
        return self.groups(layer, q.device)

    def select_heads(self, heads: Sequence[int]) -> Plan:
        """The plan of `heads` only, renumbered 0.. in that order (a sequence-parallel rank's heads)."""
        for layer, patterns in self.layers.items():
            if not heads or min(heads) < 0 or max(heads) >= len(patterns):
                raise ValueError(f"heads: expected indices of the {len(patterns)} heads of layer {layer}, got {heads}")
        layers = {layer: [patterns[h] for h in heads] for layer, patterns in self.layers.items()}
        stats = {layer: [head_stats[h] for h in heads] for layer, head_stats in self.stats.items()}
        return Plan(self.grid, self.block, layers, stats, self.token_order)

    def layout(self, pattern: Pattern, device: torch.device | str | None = None) -> BlockLayout:
        """`pattern`'s one-head layout for the plan's grid, block and token order."""
        return pattern.build(self.grid, block=self.block, device=device, token_order=self.token_order)

    def groups(self, layer: int, device: torch.device | str | None = None) -> list[HeadGroup]:
        """The layer's head groups (built once per layer and device, see `_build_groups`)."""
        key = (layer, torch.device(device or "cpu"))
        if key not in self._groups:
            self._groups[key] = self._build_groups(self.layers[layer], key[1])
        return self._groups[key]

    def _build_groups(self, patterns: list[Pattern], device: torch.device) -> list[HeadGroup]:
        """Head fusion: one kernel call per token order.

        The call in the model's own order covers every head, so it needs no copy: full heads have all
        blocks, skipped heads and heads of another order none (they cost nothing). Each other token
        order (the tiles of a raster model's STA heads; none with a `token_order`) then gathers its heads
        and its output replaces theirs (see `attend`).
        """
        layouts = {p: self.layout(p, device) for p in set(patterns)}
        heads_by_order: dict[object, list[int]] = {}
        for head, pattern in enumerate(patterns):
            heads_by_order.setdefault(layouts[pattern].order, []).append(head)
        groups = []
        if None in heads_by_order:
            empty = self.layout(Pattern.of("skip"), device)
            masks = [layouts[p] if layouts[p].order is None else empty for p in patterns]
            groups.append(HeadGroup(tuple(range(len(patterns))), BlockLayout.concat_heads(masks)))
        for order, heads in heads_by_order.items():
            if order is not None:
                groups.append(HeadGroup(tuple(heads), BlockLayout.concat_heads([layouts[patterns[h]] for h in heads])))
        return groups

    def save(self, path: str | Path) -> None:
        layers = {}
        for layer, patterns in sorted(self.layers.items()):
            stats = self.stats.get(layer, [{}] * len(patterns))
            layers[layer] = {head: {**pattern.to_dict(), **stats[head]} for head, pattern in enumerate(patterns)}
        document = {"grid": {"frames": self.grid.frames, "height": self.grid.height, "width": self.grid.width,
                             "text": self.grid.text},
                    "block": self.block, "layers": layers}
        if self.token_order is not None:
            document["token_order"] = {"tile": list(self.token_order.tile)}
        Path(path).write_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=None))

    @staticmethod
    def load(path: str | Path) -> Plan:
        document = yaml.safe_load(Path(path).read_text())
        for key in ("grid", "block", "layers"):
            if not isinstance(document, dict) or key not in document:
                raise ValueError(f"{path}: expected a plan with keys grid, block, layers; '{key}' is missing")
        layers, stats = {}, {}
        for layer, heads in document["layers"].items():
            if not isinstance(heads, dict) or sorted(heads) != list(range(len(heads))):
                raise ValueError(f"layers: layer {layer} must map heads 0..H-1 to patterns, got {heads!r}")
            layers[int(layer)] = [Pattern.from_dict(heads[h]) for h in range(len(heads))]
            if all(set(STAT_KEYS) <= set(heads[h]) for h in heads):  # a searched plan's
                stats[int(layer)] = [{key: heads[h][key] for key in STAT_KEYS} for h in range(len(heads))]
        grid = VideoGrid(**document["grid"])
        order = document.get("token_order")
        if order is not None and (not isinstance(order, dict) or "tile" not in order):
            raise ValueError(f"token_order: expected a mapping {{tile: [frames, rows, columns]}}, got {order!r}")
        token_order = None if order is None else TileOrder(grid, tuple(order["tile"]))
        return Plan(grid, int(document["block"]), layers, stats, token_order)


@dataclass
class _LayerRecord:
    candidates: list[list[Pattern]]  # per candidate, the pattern of each head
    layouts: list[BlockLayout | None]  # per candidate, all heads (None: full or skip)
    density: torch.Tensor  # [candidates, heads] block density
    cost: torch.Tensor  # [candidates, heads] attention time relative to dense
    squared_error: torch.Tensor  # fp64 [candidates, heads], summed over calls
    dense_power: torch.Tensor  # fp64 [], sum of the dense output squared


def calibration_error(plan: Plan) -> float:
    """The plan's error on its calibration calls: the root mean relative MSE over all its heads."""
    errors = [head["rel_mse"] for layer in plan.stats.values() for head in layer]
    return (sum(errors) / len(errors)) ** 0.5


class PatternSearch:
    """Sparse-vDiT's offline search; feed it with `observe` (or `capture_qkv`), then call `plan()`.

    Besides the static `candidates`, each head gets data-driven stripes: its `stripe_blocks` most
    attended key blocks (chosen from the first call of each layer). `token_order`:
    the order of the observed tokens (module docstring).
    """

    def __init__(self, grid: VideoGrid, candidates: Sequence[Pattern] | None = None, *, block: int = 128,
                 lam: float = 0.01, cost_model: CostModel | None = None, stripe_blocks: Sequence[int] = (1, 4),
                 backend: str = "triton", token_order: TileOrder | None = None):
        if backend not in ("triton", "reference"):
            raise ValueError(f"backend: expected 'triton' or 'reference', got {backend!r}")
        if lam < 0:
            raise ValueError(f"lam: expected >= 0, got {lam!r}")
        self.grid, self.block, self.lam, self.backend = grid, block, lam, backend
        self.candidates = list(candidates) if candidates is not None else video_candidates(grid, block=block)
        self.cost_model = cost_model if cost_model is not None else CostModel.load()
        self.stripe_blocks = tuple(stripe_blocks)
        self.token_order = token_order
        self._layers: dict[int, _LayerRecord] = {}

    @torch.no_grad()
    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Score every candidate on one call's q, k, v [B, H, N, D] (dense output as the target)."""
        if q.shape[-2] != self.grid.tokens:
            raise ValueError(f"q: {q.shape[-2]} tokens, the grid {self.grid} has {self.grid.tokens}")
        record = self._layers.get(layer)
        if record is None:
            record = self._layers[layer] = self._new_record(q, k)
        dense = attend(q, k, v, None).double()
        record.dense_power += dense.square().sum()
        for index, layout in enumerate(record.layouts):
            name = record.candidates[index][0].name
            if name == "full":
                continue
            if name == "skip":
                record.squared_error[index] += dense.square().sum(dim=(0, 2, 3))
                continue
            heads = tuple(range(q.shape[1]))
            out = attend(q, k, v, [HeadGroup(heads, layout)], backend=self.backend).double()
            record.squared_error[index] += (out - dense).square().sum(dim=(0, 2, 3))

    def plan(self, lam: float | None = None) -> Plan:
        """Per head, the candidate minimising relative MSE + lam * relative cost, the earlier one on a tie
        (`lam` defaults to the search's; the scores are kept, so trying another lam costs nothing)."""
        lam = self.lam if lam is None else lam
        if not self._layers:
            raise ValueError("observe: no calibration call was observed; run the model inside capture_qkv first")
        layers, stats = {}, {}
        for layer, record in sorted(self._layers.items()):
            heads = record.squared_error.shape[1]
            rel_mse = (record.squared_error * heads / record.dense_power.clamp(min=1e-30)).cpu()
            score = rel_mse + lam * record.cost
            # Ties go to the earlier candidate (the simpler family): equivalent layouts, e.g. a temporal
            # head's `temporal(0)` and all-frame `tiles`, differ only by the float noise of the error sums.
            best = (score <= score.min(dim=0).values + SCORE_TIE).int().argmax(dim=0).tolist()
            layers[layer] = [record.candidates[best[h]][h] for h in range(heads)]
            stats[layer] = [{"rel_mse": round(float(rel_mse[best[h], h]), 6),
                             "cost": round(float(record.cost[best[h], h]), 4),
                             "density": round(float(record.density[best[h], h]), 4)} for h in range(heads)]
        return Plan(self.grid, self.block, layers, stats, self.token_order)

    def plan_within(self, max_error: float) -> tuple[Plan, float]:
        """The cheapest plan whose calibration error, the root mean relative MSE over every head of every
        layer, is at most `max_error`, and its lam: lam swept down from 1 by factors of 0.8, then 0
        (every head at its most accurate candidate, `full` among them, so a plan is always found)."""
        if max_error < 0:
            raise ValueError(f"max_error: expected >= 0, got {max_error!r}")
        for lam in [0.8**i for i in range(50)] + [0.0]:
            plan = self.plan(lam)
            if calibration_error(plan) <= max_error:
                return plan, lam
        raise AssertionError("lam=0 picks each head's exact candidate")  # unreachable: `full` has no error

    def _new_record(self, q: torch.Tensor, k: torch.Tensor) -> _LayerRecord:
        heads = q.shape[1]
        candidates = [[pattern] * heads for pattern in self.candidates]
        candidates += self._stripe_candidates(q, k)
        layouts, density = [], []
        for patterns in candidates:
            if patterns[0].name in ("full", "skip"):
                layouts.append(None)
                density.append(torch.full((heads,), float(patterns[0].name == "full")))
                continue
            built = {p: p.build(self.grid, block=self.block, device=q.device, token_order=self.token_order)
                     for p in set(patterns)}
            layouts.append(BlockLayout.concat_heads([built[p] for p in patterns]))
            density.append(layouts[-1].density().cpu())
        density = torch.stack(density)
        cost = torch.tensor([[self.cost_model.relative_cost(patterns[h].name, float(density[c, h])) for h in range(heads)]
                             for c, patterns in enumerate(candidates)])
        squared_error = torch.zeros(len(candidates), heads, dtype=torch.float64, device=q.device)
        return _LayerRecord(candidates, layouts, density, cost, squared_error,
                            torch.zeros((), dtype=torch.float64, device=q.device))

    def _stripe_candidates(self, q: torch.Tensor, k: torch.Tensor) -> list[list[Pattern]]:
        """Per head, a stripe over its most attended key blocks (exact attention, summed over queries),
        blocks of the observed token order: with a `token_order` its keys are the raster ranges of the
        tokens of those blocks, so the stripe is whole blocks there too."""
        if not self.stripe_blocks:
            return []
        mass = attention_block_mass(q, k, self.block, self.block).sum(dim=(0, 2))  # [H, Kb]
        ranked = mass.argsort(dim=-1, descending=True).cpu()
        raster = (self.token_order.permutation() if self.token_order is not None
                  else torch.arange(self.grid.tokens))  # observed token t is raster token raster[t]
        candidates = []
        for count in self.stripe_blocks:
            patterns = []
            for head_blocks in ranked[:, :count].tolist():
                tokens = torch.cat([raster[b * self.block:(b + 1) * self.block] for b in head_blocks]).sort().values
                patterns.append(Pattern.of("stripe", keys=_token_ranges(tokens.tolist())))
            candidates.append(patterns)
        return candidates


@contextlib.contextmanager
def capture_qkv(model: nn.Module, observe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
                ) -> Iterator[None]:
    """Call `observe(layer, q, k, v)` with what every SparseAttention layer of `model` attends over.

    Run the model densely meanwhile (backend "dense" or no layout): the search compares against the
    dense output. Layers must have distinct `layer` indices.
    """
    cores = [module for module in model.modules() if isinstance(module, SparseAttentionCore)]
    if not cores:
        raise ValueError("model: has no SparseAttention layer to capture")
    if any(core.heads is not None for core in cores):
        raise ValueError("model: capture_qkv needs every head of each layer; run it without a sequence_group")
    layers = [core.layer for core in cores]
    if len(set(layers)) != len(layers):
        raise ValueError(f"model: SparseAttention layers need distinct `layer` indices, got {layers}")
    handles = [core.register_forward_pre_hook(lambda core, args: observe(core.layer, *args)) for core in cores]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _token_ranges(tokens: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted distinct token indices as (start, end) ranges of consecutive ones."""
    ranges: list[list[int]] = []
    for token in tokens:
        if ranges and ranges[-1][1] == token:
            ranges[-1][1] = token + 1
        else:
            ranges.append([token, token + 1])
    return tuple((start, end) for start, end in ranges)
