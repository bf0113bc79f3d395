"""The report of a compare: the figures `eval --compare` measures, drawn as size and latency against the
quality figures of the models' task (`COMPARE` of `llmctl.tasks.<task>.reporting`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.reporting.html import Page, Plot, Table, write_page
from llmctl.reporting.layout import ReportFiles
from llmctl.reporting.panels import ComparePanels
from llmctl.tasks import Task

KIB, MIB = 1024, 1024 * 1024


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The dir's name, with the backend where one dir gave several rows (an export dir's two graphs)."""
    same = sum(1 for r in rows if r["name"] == row["name"])
    return f"{row['name']} [{row['backend']}]" if same > 1 else row["name"]


def _size_unit(rows: list[dict[str, Any]]) -> tuple[str, float]:
    """Binary units, as the table's sizes are written (human_bytes): MiB, or KiB for models under one MiB."""
    largest = max((r["size_bytes"] or 0 for r in rows), default=0)
    return ("MiB", MIB) if largest >= MIB else ("KiB", KIB)


def plot_compare(report: dict[str, Any], files: ReportFiles, panels: ComparePanels) -> tuple[list[Plot], list[str]]:
    """Size and forward latency against the task's quality figures (perplexity; accuracy and macro-F1).

    Each model has its own colour, the same in both plots, named in a legend beside the axes; several
    quality figures are as many marker shapes. A timing that rounds disagreed on is named as disturbed in
    the legend."""
    from llmctl.reporting.plots import new_figure, save_png

    rows = report["rows"]
    plots, notes = [], []
    unit, scale = _size_unit(rows)
    axes_of = [
        ("size", "size_bytes", f"weights on disk ({unit})", scale,
         "Weights as stored: model.safetensors or the ONNX graph with its data."),
        ("latency", "forward_ms", "forward pass (ms)", 1.0, "Median wall time of one forward pass" + panels.latency_caption),
    ]
    for name, key, xlabel, x_scale, caption in axes_of:
        fig, (ax,) = new_figure()
        shown = _scatter(ax, rows, key, x_scale, panels)
        if not shown:
            notes.append(f"{xlabel} against {panels.y_name}: not drawn (not measured for any model).")
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panels.y_label)
        ax.set_title(f"{name} against {panels.quality_title}")
        title = f"{'Size' if name == 'size' else 'Latency'} against {panels.quality_title}"
        missing = [_label(r, rows) for i, r in enumerate(rows) if i not in shown]
        if missing:
            caption += f" Not measured: {', '.join(missing)}."
        plots.append(Plot(title, save_png(fig, files.plot(f"{name}-vs-{panels.y_name}")), caption))
    return plots, notes


def _scatter(ax: Any, rows: list[dict[str, Any]], key: str, x_scale: float, panels: ComparePanels) -> list[int]:
    """Each model's quality figures against `key`, in its colour, and the legend; the rows drawn."""
    from llmctl.reporting.plots import GREY, legend_outside, model_colour, scatter_models

    colours = [model_colour(i) for i in range(len(rows))]
    shown: list[int] = []
    for qkey, _, marker in panels.quality:
        drawn = [i for i, r in enumerate(rows) if r.get(key) is not None and r.get(qkey) is not None]
        if drawn:
            scatter_models(ax, [rows[i][key] / x_scale for i in drawn], [rows[i][qkey] for i in drawn],
                           [colours[i] for i in drawn], marker=marker)
            shown += [i for i in drawn if i not in shown]
    if not shown:
        return shown
    entries = []
    for i in sorted(shown):
        disturbed = key == "forward_ms" and rows[i].get("timing_disturbed")
        entries.append((_label(rows[i], rows) + (" (timing disturbed)" if disturbed else ""), colours[i], "o"))
    if panels.quality_legend:
        entries += [(label, GREY, marker) for _, label, marker in panels.quality]
    legend_outside(ax, entries)
    return shown


def compare_facts(report: dict[str, Any], panels: ComparePanels) -> list[tuple[str, str]]:
    return [("models", str(len(report["rows"]))), ("scored on", f"{report['source']}, {panels.scored(report)}")]


def _table(report: dict[str, Any], panels: ComparePanels) -> Table:
    header, body = panels.table(report["rows"])
    return Table("Models", header, body, numeric=set(panels.numeric))


def disturbed_note(rows: list[dict[str, Any]]) -> list[str]:
    """A note under the table when a row's timing rounds disagreed: another process took the CPU."""
    from llmctl.evaluation.speed import DISTURBED_SPREAD

    spreads = [r["timing_spread"] for r in rows if r.get("timing_disturbed")]
    if not spreads:
        return []
    return [f"* timing disturbed: its timing rounds differ by up to {max(spreads):.1f}x (over {DISTURBED_SPREAD}x), "
            "so another process took the CPU while it ran; compare these timings after a rerun on a quiet machine."]


def report_compare(report: dict[str, Any], out_dir: Path, task: Task) -> dict[str, Any]:
    """Write report.html and the PNG plots of a compare report of `task`'s models (as `eval --compare` returns
    it); return it with the files."""
    panels: ComparePanels = task.reporting.COMPARE
    files = ReportFiles(Path(out_dir))
    files.prepare()
    plots, notes = plot_compare(report, files, panels)
    page = Page(
        title=f"Compare of {len(report['rows'])} {panels.models}",
        subtitle=", ".join(dict.fromkeys(r["name"] for r in report["rows"])),
        facts=compare_facts(report, panels),
        plots=plots,
        notes=notes + disturbed_note(report["rows"]),
        tables=[_table(report, panels)],
    )
    write_page(files.html, page)
    return {
        "kind": "compare",
        "task": panels.label,
        **report,
        "files": files.listing(plots),
    }
