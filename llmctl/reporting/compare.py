"""The report of a compare: the figures `eval --compare` measures, drawn as size and latency against quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.reporting.html import Page, Plot, Table, write_page
from llmctl.reporting.layout import ReportFiles

KIB, MIB = 1024, 1024 * 1024


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The dir's name, with the backend where one dir gave several rows (an export dir's two graphs)."""
    same = sum(1 for r in rows if r["name"] == row["name"])
    return f"{row['name']} [{row['backend']}]" if same > 1 else row["name"]


def _size_unit(rows: list[dict[str, Any]]) -> tuple[str, float]:
    """Binary units, as the table's sizes are written (human_bytes): MiB, or KiB for models under one MiB."""
    largest = max((r["size_bytes"] or 0 for r in rows), default=0)
    return ("MiB", MIB) if largest >= MIB else ("KiB", KIB)


def plot_compare(report: dict[str, Any], files: ReportFiles, *, classifier: bool) -> tuple[list[Plot], list[str]]:
    """Size and forward latency against perplexity (language models) or accuracy and macro-F1 (classifiers).

    Each model has its own colour, the same in both plots, named in a legend beside the axes; a classifier's
    two scores are two marker shapes. A timing that rounds disagreed on is named as disturbed in the legend."""
    from llmctl.reporting.plots import GREY, legend_outside, model_colour, new_figure, save_png, scatter_models

    rows = report["rows"]
    colours = [model_colour(i) for i in range(len(rows))]
    plots, notes = [], []
    unit, scale = _size_unit(rows)
    axes_of = [
        ("size", "size_bytes", f"weights on disk ({unit})", scale,
         "Weights as stored: model.safetensors or the ONNX graph with its data."),
        ("latency", "forward_ms", "forward pass (ms)", 1.0,
         "Median wall time of one forward pass" + (" over a batch of val texts." if classifier else ", batch 1 at full context.")),
    ]
    if classifier:
        quality = [("accuracy", "accuracy", "o"), ("macro_f1", "macro-F1", "s")]
    else:
        quality = [("perplexity", "perplexity", "o")]
    y_name = "accuracy" if classifier else "perplexity"
    for name, key, xlabel, x_scale, caption in axes_of:
        fig, (ax,) = new_figure()
        shown: list[int] = []
        for qkey, _, marker in quality:
            drawn = [i for i, r in enumerate(rows) if r.get(key) is not None and r.get(qkey) is not None]
            if drawn:
                scatter_models(ax, [rows[i][key] / x_scale for i in drawn], [rows[i][qkey] for i in drawn],
                               [colours[i] for i in drawn], marker=marker)
                shown += [i for i in drawn if i not in shown]
        if not shown:
            notes.append(f"{xlabel} against {y_name}: not drawn (not measured for any model).")
            continue
        entries = []
        for i in sorted(shown):
            disturbed = key == "forward_ms" and rows[i].get("timing_disturbed")
            entries.append((_label(rows[i], rows) + (" (timing disturbed)" if disturbed else ""), colours[i], "o"))
        if classifier:
            entries += [(label, GREY, marker) for _, label, marker in quality]
        legend_outside(ax, entries)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score on the val split (higher is better)" if classifier else "perplexity (lower is better)")
        ax.set_title(f"{name} against {'accuracy and macro-F1' if classifier else 'perplexity'}")
        title = f"{'Size' if name == 'size' else 'Latency'} against {'accuracy and macro-F1' if classifier else 'perplexity'}"
        missing = [_label(r, rows) for i, r in enumerate(rows) if i not in shown]
        if missing:
            caption += f" Not measured: {', '.join(missing)}."
        plots.append(Plot(title, save_png(fig, files.plot(f"{name}-vs-{y_name}")), caption))
    return plots, notes


def compare_facts(report: dict[str, Any], *, classifier: bool) -> list[tuple[str, str]]:
    scored = f"{report['examples']:,} texts" if classifier else f"{report['tokens']:,} tokens"
    return [("models", str(len(report["rows"]))), ("scored on", f"{report['source']}, {scored}")]


def _table(report: dict[str, Any], *, classifier: bool) -> Table:
    from llmctl.units import human_bytes

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = report["rows"]
    if classifier:
        header = ["model", "backend", "accuracy", "macro-F1", "size", "forward ms", "batch"]
        body = [[r["name"], r["backend"], num(r["accuracy"], ".4f"), num(r["macro_f1"], ".4f"), human_bytes(r["size_bytes"]),
                 num(r["forward_ms"], ".2f") + _mark(r),
                 "-" if r["forward_batch"] is None else f"{r['forward_batch']}x{r['forward_tokens']}"]
                for r in rows]
    else:
        header = ["model", "backend", "perplexity", "Δ%", "size", "forward ms", "gen tok/s"]
        body = [[r["name"], r["backend"], num(r["perplexity"], ".3f"), num(r.get("perplexity_change_pct"), "+.2f"),
                 human_bytes(r["size_bytes"]), num(r["forward_ms"], ".2f") + _mark(r),
                 num(r["generate_tokens_per_s"], ".0f") + _mark(r)] for r in rows]
    return Table("Models", header, body, numeric={2, 3, 4, 5, 6})


def _mark(row: dict[str, Any]) -> str:
    return " *" if row.get("timing_disturbed") else ""


def disturbed_note(rows: list[dict[str, Any]]) -> list[str]:
    """A note under the table when a row's timing rounds disagreed: another process took the CPU."""
    from llmctl.evaluation.speed import DISTURBED_SPREAD

    spreads = [r["timing_spread"] for r in rows if r.get("timing_disturbed")]
    if not spreads:
        return []
    return [f"* timing disturbed: its timing rounds differ by up to {max(spreads):.1f}x (over {DISTURBED_SPREAD}x), "
            "so another process took the CPU while it ran; compare these timings after a rerun on a quiet machine."]


def report_compare(report: dict[str, Any], out_dir: Path, *, classifier: bool) -> dict[str, Any]:
    """Write report.html and the PNG plots of a compare report (as `eval --compare` returns it); return it with the files."""
    files = ReportFiles(Path(out_dir))
    files.prepare()
    plots, notes = plot_compare(report, files, classifier=classifier)
    page = Page(
        title=f"Compare of {len(report['rows'])} {'classifiers' if classifier else 'models'}",
        subtitle=", ".join(dict.fromkeys(r["name"] for r in report["rows"])),
        facts=compare_facts(report, classifier=classifier),
        plots=plots,
        notes=notes + disturbed_note(report["rows"]),
        tables=[_table(report, classifier=classifier)],
    )
    write_page(files.html, page)
    return {
        "kind": "compare",
        "task": "classifier" if classifier else "lm",
        **report,
        "files": files.listing(plots),
    }
