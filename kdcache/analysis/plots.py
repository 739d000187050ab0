"""The figures of ``kdcache calibrate`` and ``kdcache report`` (matplotlib, Agg backend: files only,
no display). Each function takes numbers already computed and writes one PNG; none reads a cache.

Readability rules every figure follows: a title and both axis labels; class ticks every class up
to ``ALL_TICKS`` classes and thinned beyond; values written in cells only where they fit
(``ANNOTATE_MAX`` classes); ``bbox_inches="tight"`` so nothing is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError

DPI = 110
ALL_TICKS = 30  # class ticks: every class up to this many, thinned beyond
ANNOTATE_MAX = 12  # write values in the cells of a matrix up to this many rows/columns


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("kdcache calibrate and kdcache report draw with matplotlib: "
                          "pip install 'kdcache[analysis]'") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)


def _class_ticks(axis_set, n: int) -> None:
    """Ticks for classes 0..n-1: all of them when they fit, else about ALL_TICKS evenly."""
    step = 1 if n <= ALL_TICKS else int(np.ceil(n / ALL_TICKS))
    ticks = np.arange(0, n, step)
    axis_set(ticks)


# --- reliability -------------------------------------------------------------------------------------
def _reliability_axes(ax, ax_count, rel, title: str) -> None:
    """Accuracy per confidence bin against the diagonal (top), and the share of rows per bin (below)."""
    accuracy, confidence = rel.per_bin()
    edges = np.linspace(0, 1, rel.bins + 1)
    width = edges[1] - edges[0]
    left = edges[:-1]
    has = rel.count > 0
    ax.bar(left[has], accuracy[has], width=width, align="edge", color="#4c72b0", edgecolor="white",
           label="accuracy")
    gap_bottom = np.minimum(accuracy, confidence)[has]
    ax.bar(left[has], np.abs(confidence - accuracy)[has], bottom=gap_bottom, width=width, align="edge",
           color="#dd8452", alpha=0.45, edgecolor="#dd8452", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="0.3", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    share = rel.count / max(rel.rows, 1)
    ax_count.bar(left, share, width=width, align="edge", color="0.55", edgecolor="white")
    ax_count.set_xlim(0, 1)
    ax_count.set_xlabel("confidence (top-1 probability)")
    ax_count.set_ylabel("share of rows")


def _reliability_grid(plt, panels: int, width: float):
    fig = plt.figure(figsize=(width, 4.6))
    grid = fig.add_gridspec(2, panels, height_ratios=[3, 1], hspace=0.08, wspace=0.25)
    pairs = []
    for i in range(panels):
        ax = fig.add_subplot(grid[0, i])
        pairs.append((ax, fig.add_subplot(grid[1, i], sharex=ax)))
    return fig, pairs


def reliability(rel, path: Path, title: str) -> None:
    """One reliability diagram."""
    plt = _pyplot()
    fig, [(ax, ax_count)] = _reliability_grid(plt, 1, 5.2)
    _reliability_axes(ax, ax_count, rel, f"{title}\nECE {rel.ece:.4f}, accuracy {rel.accuracy:.4f}")
    _save(fig, path)


def reliability_pair(result, path: Path, title: str) -> None:
    """Before (T = 1) and after (T fitted) temperature scaling, side by side, ECE in the titles."""
    plt = _pyplot()
    fig, [(a0, c0), (a1, c1)] = _reliability_grid(plt, 2, 10.5)
    _reliability_axes(a0, c0, result.before, f"before: T = 1\nECE {result.before.ece:.4f}, NLL {result.nll_before:.4f}")
    _reliability_axes(a1, c1, result.after, f"after: T = {result.temperature:.3f}\n"
                                             f"ECE {result.after.ece:.4f}, NLL {result.nll_after:.4f}")
    fig.suptitle(_short(title), y=1.03)
    _save(fig, path)


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


# --- the cache's rows -------------------------------------------------------------------------------
def stacked_histograms(panels: Sequence[tuple[str, np.ndarray, dict[str, np.ndarray]]], path: Path,
                       title: str) -> None:
    """Side-by-side histograms with pre-computed counts: ``(x label, bin edges, {series: counts})``,
    series stacked (teacher right, wrong, unlabelled)."""
    plt = _pyplot()
    colors = {"teacher right": "#55a868", "teacher wrong": "#c44e52", "unlabelled": "0.6"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (label, edges, series) in zip(axes[0], panels):
        bottom = np.zeros(len(edges) - 1)
        for name, counts in series.items():
            if counts.sum() == 0:
                continue
            ax.bar(edges[:-1], counts, width=np.diff(edges), bottom=bottom, align="edge", label=name,
                   color=colors.get(name), edgecolor="none")
            bottom += counts
        ax.set_xlabel(label)
        ax.set_ylabel("rows")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(f"{label.split(' (')[0]}")
        ax.legend(fontsize=8)
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    _save(fig, path)


def per_class_bars(series: dict[str, np.ndarray], path: Path, title: str, ylabel: str, overall: float | None = None,
                   diverging: bool = False) -> None:
    """One bar per class for each series (grouped); ``diverging``: signed values around 0 (a change)."""
    plt = _pyplot()
    n = len(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.32 * n * max(1, len(series)) + 2), 16), 3.8))
    width = 0.8 / len(series)
    x = np.arange(n)
    for i, (name, values) in enumerate(series.items()):
        colors = None
        if diverging:
            colors = np.where(np.nan_to_num(values) >= 0, "#55a868", "#c44e52")
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(values), width=width, label=name,
               color=colors if len(series) == 1 else None)
    if overall is not None:
        ax.axhline(overall, color="0.3", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
    if diverging:
        ax.axhline(0, color="0.2", linewidth=0.8)
    else:
        ax.set_ylim(0, 1.05)
    _class_ticks(ax.set_xticks, n)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("class")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1 or overall is not None or diverging:  # below the axes: bars fill the whole height
        handles = len(series) + (overall is not None)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(handles, 4), frameon=False)
    _save(fig, path)


def matrix(values: np.ndarray, path: Path, title: str, xlabel: str, ylabel: str, *, xticks: Sequence[str] | None = None,
           yticks: Sequence[str] | None = None, cmap: str = "Blues", center: bool = False, fmt: str = "{:.2f}",
           colorbar: str = "", skip_zeros: bool = False) -> None:
    """A heatmap (confusion matrix, T × α grid, per-class changes); NaN cells are left blank, and
    with ``skip_zeros`` cells of exactly 0 carry no number (a confusion matrix is mostly zeros)."""
    plt = _pyplot()
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(max(4.5, 0.42 * cols + 2.5), 14), min(max(3.5, 0.36 * rows + 1.8), 12)))
    finite = values[np.isfinite(values)]
    if center:
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        vmin, vmax = -max(bound, 1e-9), max(bound, 1e-9)
    else:
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    if colorbar:
        bar.set_label(colorbar)
    if xticks is None:
        _class_ticks(ax.set_xticks, cols)
    else:
        ax.set_xticks(np.arange(cols), labels=list(xticks))
    if yticks is None:
        _class_ticks(ax.set_yticks, rows)
    else:
        ax.set_yticks(np.arange(rows), labels=list(yticks))
    if rows <= ANNOTATE_MAX and cols <= ANNOTATE_MAX:
        mid = (vmin + vmax) / 2
        for i in range(rows):
            for j in range(cols):
                v = values[i, j]
                if np.isfinite(v) and (v != 0 or not skip_zeros):
                    dark = abs(v) > abs(mid) * 1.2 if center else v > mid
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _save(fig, path)


def curves(series: dict[str, tuple[list[int], list[float]]], path: Path, title: str, ylabel: str) -> None:
    """One line per run (epoch → value); a legend only while it stays legible."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) <= 20 else None, markersize=3, linewidth=1.2, label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)
