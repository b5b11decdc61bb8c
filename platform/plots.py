"""Pictures of sparse training: expert load, chunk-level sparsity, runs side by side.

Pure functions from numpy arrays to a matplotlib Figure, so that the trainer, `launch/compare.py` and a
notebook draw the same pictures; reading a store is the caller's job. Figures are built on the Agg canvas
without pyplot: no global figure registry to leak into, no display needed, safe in Ray workers.
"""

import math
from pathlib import Path

import numpy as np

ZERO_COMPUTATION_KEYS = ("moe/zero_slot_fraction", "moe/copy_slot_fraction", "moe/constant_slot_fraction")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    """Write a PNG the same way everywhere (dpi 120, tight box). The figures here are not registered
    with pyplot, so there is nothing to close: they are freed once unreferenced."""
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges halfway between logging steps: uneven intervals keep their width, a single step gets width 1."""
    if len(centres) == 1:
        return centres[0] + np.array([-0.5, 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def loss_curve(history: dict):
    """train/loss as a line and val/loss as points against the step; history: metric -> (steps, values)."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if key in history:
            ax.plot(*history[key], style, label=key)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def expert_load_heatmap(steps: np.ndarray, load: np.ndarray, layer_names: list[str]):
    """One heat-map per MoE layer (expert on y, step on x) on one colour scale from 0, so that layers
    compare at a glance and a balanced router shows as one even colour.

    steps [n]; load [n, L, E]: share of tokens routed to each expert at each logging step.
    """
    steps, load = np.asarray(steps), np.asarray(load, dtype=float)
    if load.ndim != 3 or load.shape[:2] != (len(steps), len(layer_names)):
        raise ValueError(f"load: expected shape [steps={len(steps)}, layers={len(layer_names)}, experts], "
                         f"got {list(load.shape)}")
    from matplotlib.ticker import MaxNLocator

    layers, experts = load.shape[1:]
    cols = min(layers, 4)
    rows = math.ceil(layers / cols)
    fig = _figure(3.2 * cols + 1.2, (1.3 + 0.02 * experts) * rows + 0.8)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    # The mean load sits mid-scale (or below, when an expert takes more than twice it): a balanced
    # router is one even mid colour, hot experts are bright and starved ones dark.
    vmax = max(float(load.max()), 2 * float(load.mean()), 1e-12)
    step_edges = _cell_edges(steps.astype(float))
    for index, ax in enumerate(axes.flat):
        if index >= layers:
            ax.remove()
            continue
        mesh = ax.pcolormesh(step_edges, np.arange(experts + 1) - 0.5, load[:, index, :].T, cmap="viridis",
                             vmin=0.0, vmax=vmax)
        ax.set_title(layer_names[index], fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.tick_params(labelsize=7)
        if index % cols == 0:
            ax.set_ylabel("expert", fontsize=8)
        if index + cols >= layers:
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    shrink = 1.0 if rows <= 2 else 0.6
    fig.colorbar(mesh, ax=axes.flat[:layers], label="share of tokens", shrink=shrink, aspect=20 * rows * shrink)
    fig.suptitle("expert load")
    return fig


def cls_by_chunk_size(chunk_sizes, cls: np.ndarray, layer_names: list[str]):
    """Chunk-level sparsity against chunk size: how much a chunk-wise kernel could skip per layer,
    and how fast that shrinks with the chunk (the mean over layers in bold)."""
    chunk_sizes, cls = np.asarray(chunk_sizes), np.asarray(cls, dtype=float)
    if cls.shape != (len(layer_names), len(chunk_sizes)):
        raise ValueError(f"cls: expected shape [layers={len(layer_names)}, chunk sizes={len(chunk_sizes)}], "
                         f"got {list(cls.shape)}")
    from matplotlib import colormaps
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(layer_names)))
    for name, row, colour in zip(layer_names, cls, colours):
        ax.plot(chunk_sizes, row, "o-", color=colour, lw=1, ms=3, alpha=0.8, label=name)
    ax.plot(chunk_sizes, cls.mean(axis=0), "o-", color="black", lw=2.8, ms=5, label="mean")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(chunk_sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(int(size)) for size in chunk_sizes])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("chunk size (tokens)")
    ax.set_ylabel("CLS (share of experts no token of the chunk uses)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncols=math.ceil((len(layer_names) + 1) / 16))
    ax.set_title("chunk-level sparsity")
    return fig


def zero_computation_fraction(history: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """MoE++: the share of token-expert slots on zero, copy and constant experts, summed, at the
    steps all logged kinds share; None for other routers."""
    series = [history[key] for key in ZERO_COMPUTATION_KEYS if key in history]
    if not series:
        return None
    steps = series[0][0]
    for other_steps, _ in series[1:]:
        steps = np.intersect1d(steps, other_steps)
    total = sum(np.asarray(values, dtype=float)[np.isin(own_steps, steps)] for own_steps, values in series)
    return np.asarray(steps), total


def compare_runs(histories: list[dict], labels: list[str]):
    """Runs side by side on a 2x2 panel: loss, sparsity (TLS solid, CLS8 dashed), throughput, and the
    zero-computation fraction (MoE++) or, without it, the gradient norm. One colour per run.

    histories: per run, metric name -> (steps [n], values [n]), as `sparta.platform` logs them.
    """
    if len(histories) != len(labels):
        raise ValueError(f"labels: expected one per history ({len(histories)}), got {len(labels)}")
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import StrMethodFormatter

    fig = _figure(12, 7.5)
    (loss, sparsity), (speed, last) = fig.subplots(2, 2)
    colours = colormaps["tab10"].colors
    zc = [zero_computation_fraction(history) for history in histories]
    show_zc = any(series is not None for series in zc)

    def plot(ax, series, colour, style, **kwargs):
        if series is not None:
            ax.plot(*series, style, color=colour, **kwargs)

    for index, (history, label) in enumerate(zip(histories, labels)):
        colour = colours[index % len(colours)]
        plot(loss, history.get("train/loss"), colour, "-", lw=1.5)
        plot(loss, history.get("val/loss"), colour, "o", ms=6)
        plot(sparsity, history.get("moe/tls"), colour, "-", lw=1.5)
        plot(sparsity, history.get("moe/cls8"), colour, "--", lw=1.5)
        plot(speed, history.get("train/tokens_per_s"), colour, "-", lw=1.5)
        plot(last, zc[index] if show_zc else history.get("train/grad_norm"), colour, "-", lw=1.5)

    loss.set(title="loss", ylabel="cross-entropy (nats/token)")
    loss.legend(handles=[Line2D([], [], color="grey", ls="-", label="train"),
                         Line2D([], [], color="grey", ls="", marker="o", label="val")], fontsize=8)
    sparsity.set(title="sparsity (model mean)", ylabel="share of experts", ylim=(0.0, 1.0))
    if sparsity.lines:
        sparsity.legend(handles=[Line2D([], [], color="grey", ls="-", label="TLS"),
                                 Line2D([], [], color="grey", ls="--", label="CLS, chunk 8")], fontsize=8)
    else:
        sparsity.text(0.5, 0.5, "n/a (no MoE metrics)", transform=sparsity.transAxes, ha="center", va="center",
                      color="grey")
        sparsity.set_axis_off()
    speed.set(title="throughput", ylabel="tokens/s", ylim=(0, None))
    speed.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    if show_zc:
        last.set(title="zero-computation experts (MoE++)", ylabel="share of slots (zero + copy + constant)", ylim=(0, None))
    else:
        last.set(title="gradient norm", ylabel="global L2 norm")
    for ax in (loss, sparsity, speed, last):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    runs = [Line2D([], [], color=colours[i % len(colours)], lw=2, label=label) for i, label in enumerate(labels)]
    fig.legend(handles=runs, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9)
    return fig
