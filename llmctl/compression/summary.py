"""compress's before/after table as text cells: what a task's compression module fills and the CLI draws.

A row is (what, before, after, change). A timing whose rounds disagreed (another process took the CPU)
is marked `*`, as `llmctl.cli.output.add_disturbed_caption` explains under the table.
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str]


def number(v: Any, fmt: str) -> str:
    """`v` formatted, or `-` when it was not measured."""
    return "-" if v is None else format(v, fmt)


def change(x: Any, y: Any, *, pct: bool = False) -> str:
    """After `y` against before `x`: a ratio (`0.42x`), or with `pct` a percentage (`+1.20%`)."""
    if not x or not y:
        return "-"
    if pct:
        return f"{100 * (y / x - 1):+.2f}%"
    return f"{y / x:.2f}x"


def points(x: Any, y: Any) -> str:
    """After `y` against before `x`, both fractions, in percentage points (`+0.50 pts`)."""
    return "-" if x is None or y is None else f"{100 * (y - x):+.2f} pts"


def speed_change(ratio: float | None) -> str:
    """A speed ratio (after / before; above 1 is faster) as people say it: `2.00× faster`, `1.45× slower`."""
    if not ratio:
        return "-"
    if ratio >= 1:
        return f"{ratio:.2f}× faster"
    return f"{1 / ratio:.2f}× slower"


def timed(cell: str, side: dict[str, Any]) -> str:
    """A timing cell, marked `*` when that side's timing rounds disagreed."""
    return f"{cell} *" if side.get("timing_disturbed") else cell


def size_rows(before: dict[str, Any], after: dict[str, Any]) -> list[Row]:
    """The rows every compression table starts with: parameters, non-zero parameters, size on disk."""
    from llmctl.units import human_bytes

    b, a = before, after
    return [
        ("parameters", number(b["parameters"], ","), number(a["parameters"], ","), change(b["parameters"], a["parameters"])),
        ("non-zero parameters", number(b["nonzero_parameters"], ","), number(a["nonzero_parameters"], ","),
         change(b["nonzero_parameters"], a["nonzero_parameters"])),
        ("size on disk", human_bytes(b["size_bytes"]), human_bytes(a["size_bytes"]), change(b["size_bytes"], a["size_bytes"])),
    ]


def latency_row(what: str, before: dict[str, Any], after: dict[str, Any]) -> Row:
    """The forward latency row: each side's milliseconds (marked when disturbed) and the speed change."""
    b, a = before, after
    cells = [timed(number(m["forward_ms"], ".2f") + " ms", m) if m["forward_ms"] else "-" for m in (b, a)]
    speed = speed_change(b["forward_ms"] / a["forward_ms"] if b["forward_ms"] and a["forward_ms"] else None)
    return (what, *cells, speed)
