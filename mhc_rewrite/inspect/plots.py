"""Plots of stream diagnostics: Amax gain against depth, and H_res heat maps.

Both are made to be read at a glance at 100 % zoom: text of at least 8 pt, every label inside the canvas
(matplotlib's constrained layout at a fixed figure size), a legend or colour scale for what colours mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Union

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from .diagnostics import StreamDiagnostics  # noqa: E402

#: A gain within this distance of 1 is 1 up to float error: float32 maps composed over depth, and Sinkhorn's
#: own tolerance, stay far below it, while any real drift (the paper's 1.6 for mHC at 27B) is far above.
FLAT_TOLERANCE = 1e-4

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

Diagnosed = Union[StreamDiagnostics, Mapping[str, StreamDiagnostics]]


def _named(diagnostics: Diagnosed) -> dict[str, StreamDiagnostics]:
    if isinstance(diagnostics, StreamDiagnostics):
        return {"": diagnostics}
    if not diagnostics:
        raise ValueError("plot_gains needs at least one StreamDiagnostics")
    return dict(diagnostics)


def _series(named: dict[str, StreamDiagnostics]) -> list[tuple[str, str, str, list[float]]]:
    """``(model label, chain label, direction, gains)`` for every line to draw."""
    out = []
    for name, diag in named.items():
        for chain, gains in diag.gains.items():
            chain_label = f"chain {chain}" if len(diag.gains) > 1 else ""
            for direction in ("forward", "backward"):
                out.append((name, chain_label, direction, list(gains[direction])))
    return out


def plot_gains(diagnostics: Diagnosed, path: str | Path, dpi: int = 100, figsize: tuple[float, float] = (7.5, 4.2),
               title: str = "Amax gain of the composite residual map") -> Path:
    """Save :func:`gains_figure` to ``path`` (its extension picks the format); returns the path.

    Example:
        >>> plot_gains({"HC": stream_diagnostics(hc, x), "mHC": stream_diagnostics(mhc, x)}, "gains.png")
    """
    return _save(gains_figure(diagnostics, dpi, figsize, title), path, dpi)


def gains_figure(diagnostics: Diagnosed, dpi: int = 100, figsize: tuple[float, float] = (7.5, 4.2),
                 title: str = "Amax gain of the composite residual map") -> Figure:
    """Forward and backward Amax gain of the composite residual map against depth.

    A line whose gain is 1 within :data:`FLAT_TOLERANCE` at every depth is drawn flat at 1 and labelled so
    (float noise is not plotted as a trend); otherwise the y axis is linear for gains below 10 and logarithmic
    with plain-number ticks (1, 10, 100, ...) above.

    Args:
        diagnostics: one :class:`StreamDiagnostics`, or several by name to compare them on one chart,
            e.g. ``{"HC": diag_hc, "mHC": diag_mhc}`` (one colour per name; solid forward, dashed backward).
        dpi, figsize: the picture is ``figsize * dpi`` pixels.
        title: the chart's title.
    Returns:
        The matplotlib ``Figure`` (close it with ``matplotlib.pyplot.close`` when done).
    """
    named = _named(diagnostics)
    series = _series(named)
    colors = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(named)}
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi, layout="constrained")
    largest = max(max(g) for *_, g in series)
    smallest = min(min(g) for *_, g in series)
    for name, chain, direction, gains in series:
        deviation = max(abs(g - 1.0) for g in gains)
        label = " ".join(part for part in (name, chain, direction) if part)
        if deviation < FLAT_TOLERANCE:
            label += f" = 1 within float error (|gain − 1| ≤ {deviation:.0e})"
        dashed = direction == "backward"
        ax.plot(range(1, len(gains) + 1), gains, color=colors[name], linestyle="--" if dashed else "-",
                marker="s" if dashed else "o", markersize=4, linewidth=1.6, label=label)
    ax.axhline(1.0, color="#555555", linewidth=0.8, zorder=0)
    if largest - 1.0 < FLAT_TOLERANCE and 1.0 - smallest < FLAT_TOLERANCE:
        ax.set_ylim(0.5, 1.5)  # every line is flat: a scale on which float noise cannot show
        ax.text(0.5, 0.56, "flat: gain = 1 at every depth, within float error", transform=ax.transAxes,
                ha="center", fontsize=10, color="#333333")
    elif largest < 10 and smallest > 0:
        ax.set_ylim(min(0.9, smallest * 0.95), largest * 1.08)
    else:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    depth = max(len(g) for *_, g in series)
    ax.set_xticks(range(1, depth + 1) if depth <= 24 else np.linspace(1, depth, 9).round().astype(int))
    ax.set_xlabel("depth: residual sites composed (forward: from the input; backward: from the output)", fontsize=9)
    ax.set_ylabel("Amax gain (1 = no growth)", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _grid(count: int, max_columns: int = 8) -> tuple[int, int]:
    """``(rows, columns)``: near-square, no empty panel when a divisor of ``count`` allows it."""
    if count <= 3:
        return 1, count
    for columns in range(math.ceil(math.sqrt(count)), max_columns + 1):
        if count % columns == 0:
            return count // columns, columns
    columns = min(max_columns, count)
    return math.ceil(count / columns), columns


def _common_prefix(paths: list[str]) -> str:
    """The dotted module prefix all ``paths`` share, minus its last part (kept so titles stay meaningful)."""
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    common = common[:-1] if len(common) < min(len(p) for p in parts) else common[:-2]
    return ".".join(common) + "." if common else ""


def plot_h_res(diagnostics: StreamDiagnostics, path: str | Path, dpi: int = 100, columns: int | None = None) -> Path:
    """Save :func:`h_res_figure` to ``path`` (its extension picks the format); returns the path."""
    return _save(h_res_figure(diagnostics, dpi, columns), path, dpi)


def h_res_figure(diagnostics: StreamDiagnostics, dpi: int = 100, columns: int | None = None) -> Figure:
    """Heat maps of the token-averaged ``H_res`` of every site, in depth order, on one colour scale.

    Args:
        diagnostics: from :func:`mhc_rewrite.stream_diagnostics`.
        dpi: pixels per inch.
        columns: panels per row; by default a near-square grid that leaves no panel empty when the number of
            sites allows it (8 sites: 4 x 2), else 8 per row with the empty places removed.
    Returns:
        The matplotlib ``Figure``.
    """
    sites = diagnostics.sites
    if not sites:
        raise ValueError("no site to draw")
    rows, columns = _grid(len(sites)) if columns is None else (math.ceil(len(sites) / columns), columns)
    n = sites[0].h_res.shape[-1]
    panel = 1.7 if n <= 4 else 2.2
    values = np.stack([s.h_res.numpy() for s in sites])
    low, high = min(0.0, float(values.min())), max(1.0, float(values.max()))
    signed = low < 0
    fig = plt.figure(figsize=(panel * columns + 1.1, panel * rows + 0.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    prefix = _common_prefix([s.module_path for s in sites])
    for ax, site, h in zip(axes.flat, sites, values):
        image = ax.imshow(h, cmap="RdBu_r" if signed else "viridis", vmin=-high if signed else low, vmax=high)
        ax.set_title(_short(site.index, site.module_path[len(prefix):]), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if n <= 6:
            for i in range(n):
                for j in range(n):
                    dark = (h[i, j] - low) / (high - low) < 0.5 and not signed
                    ax.text(j, i, f"{h[i, j]:.2f}", ha="center", va="center", fontsize=8 if n <= 4 else 7,
                            color="white" if dark else "black")
    for ax in axes.flat[len(sites):]:
        fig.delaxes(ax)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, pad=0.02)
    bar.set_label("H_res entry", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    fig.suptitle(f"H_res per site{f' (in {prefix[:-1]})' if prefix else ''}, token mean: row = stream out, "
                 "column = stream in", fontsize=9)
    return fig


def _short(index: int, module_path: str, width: int = 24) -> str:
    """``"3: layers.1.mlp"``, keeping the end of long module paths (the part that differs)."""
    text = f"{index}: {module_path or '<root>'}"
    return text if len(text) <= width else f"{index}: …" + module_path[-(width - len(str(index)) - 3):]


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
