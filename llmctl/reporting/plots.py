"""matplotlib without a display: one figure per PNG, fixed colours, written atomically.

Figures are made with `matplotlib.figure.Figure` rather than pyplot, so drawing touches no global
state and needs no backend switch; only Optuna's plotting helpers go through pyplot.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from llmctl.artifacts import write_atomic

# Named colours, so a test can find a series' pixels in the PNG.
TRAIN = "#1f77b4"  # training loss, the main series of a one-line plot
VAL = "#d62728"  # validation loss and metrics
SECOND = "#2ca02c"  # a second validation metric (F1 beside accuracy)
POINTS = "#9467bd"  # compared models

DPI = 100


def new_figure(ncols: int = 1, *, width: float = 6.4, height: float = 4.0) -> tuple[Any, list[Any]]:
    """A figure of `ncols` axes side by side, each `width` x `height` inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def save_png(fig: Any, path: Path) -> Path:
    """Render `fig` to `path` as PNG (atomically) and return the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


def log_if_wide(ax: Any, values: Sequence[float], ratio: float = 100.0) -> None:
    """A log y-axis when positive values span more than `ratio` (a gradient-norm spike would flatten the rest)."""
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if positive and len(positive) == len([v for v in values if v is not None]) and max(positive) / min(positive) > ratio:
        ax.set_yscale("log")


def finite(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[float], list[float]]:
    """The (x, y) pairs where both are numbers and y is finite (a diverged run logs inf/NaN)."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(xs, ys)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def labelled_scatter(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], *, color: str = POINTS,
                     marker: str = "o", legend: str | None = None) -> None:
    """One marker per point, each annotated with its label."""
    ax.scatter(xs, ys, s=90, color=color, marker=marker, label=legend, zorder=3)
    seen: dict[tuple[float, float], int] = {}
    for x, y, text in zip(xs, ys, labels):
        # Models with the same figures (a copy, an identical checkpoint) share a point: stack their labels.
        n = seen[(x, y)] = seen.get((x, y), -1) + 1
        ax.annotate(text, (x, y), xytext=(6, 6 - 11 * n), textcoords="offset points", fontsize=8)
    ax.margins(0.2)
