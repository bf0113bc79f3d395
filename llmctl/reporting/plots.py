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
# Compared models, one colour each (none of the series colours above, nor grey).
MODELS = ("#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#393b79", "#ad494a")
POINTS = MODELS[0]  # the first compared model
GREY = "#7f7f7f"  # legend entries that stand for a marker shape, not a model

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


def model_colour(i: int) -> str:
    """The colour of the i-th compared model, the same in every plot of a report."""
    return MODELS[i % len(MODELS)]


def scatter_models(ax: Any, xs: Sequence[float], ys: Sequence[float], colours: Sequence[str], *, marker: str = "o",
                   size: float = 90.0) -> None:
    """One marker per model, in its own colour. Points that fall on (nearly) one place, such as a model and an
    identical copy, are drawn as concentric markers, the first largest, so every colour stays visible."""
    span_x = (max(xs) - min(xs)) or abs(max(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or abs(max(ys)) or 1.0

    def near(i: int, j: int) -> bool:
        return abs(xs[i] - xs[j]) <= 0.03 * span_x and abs(ys[i] - ys[j]) <= 0.03 * span_y

    sizes = []
    for i in range(len(xs)):
        later = sum(1 for j in range(i + 1, len(xs)) if near(i, j))
        sizes.append(size * (1 + 1.6 * later))
    for rank, i in enumerate(sorted(range(len(xs)), key=lambda i: -sizes[i])):
        ax.scatter([xs[i]], [ys[i]], s=sizes[i], color=colours[i], marker=marker, edgecolors="white", linewidths=1.0,
                   zorder=3 + rank)
    ax.margins(0.2)


def legend_outside(ax: Any, entries: Sequence[tuple[str, str, str]]) -> None:
    """A legend to the right of the axes, one (label, colour, marker) entry a line, so no label covers a point."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker=marker, markersize=8, color=colour) for _, colour, marker in entries]
    ax.legend(handles, [label for label, _, _ in entries], loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, fontsize=8, frameon=False)
