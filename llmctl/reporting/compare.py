"""The report of a compare: the figures `eval --compare` measures, drawn as size and latency against quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.reporting.html import Page, Plot, Table, write_page
from llmctl.reporting.layout import ReportFiles

MB = 1e6


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The dir's name, with the backend where one dir gave several rows (an export dir's two graphs)."""
    same = sum(1 for r in rows if r["name"] == row["name"])
    return f"{row['name']} [{row['backend']}]" if same > 1 else row["name"]


def plot_compare(report: dict[str, Any], files: ReportFiles, *, classifier: bool) -> tuple[list[Plot], list[str]]:
    """Size and forward latency against perplexity (language models) or accuracy and macro-F1 (classifiers)."""
    from llmctl.reporting.plots import POINTS, SECOND, VAL, labelled_scatter, new_figure, save_png

    rows = report["rows"]
    plots, notes = [], []
    axes_of = [
        ("size", "size_bytes", "weights on disk (MB)", MB, "Weights as stored: model.safetensors or the ONNX graph with its data."),
        ("latency", "forward_ms", "forward pass (ms)", 1.0,
         "Median wall time of one forward pass" + (" over a batch of val texts." if classifier else ", batch 1 at full context.")),
    ]
    if classifier:
        quality = [("accuracy", "accuracy", VAL, "o"), ("macro_f1", "macro-F1", SECOND, "s")]
    else:
        quality = [("perplexity", "perplexity", POINTS, "o")]
    y_name = "accuracy" if classifier else "perplexity"
    for name, key, xlabel, scale, caption in axes_of:
        fig, (ax,) = new_figure()
        drawn = False
        for qkey, qlabel, color, marker in quality:
            points = [r for r in rows if r.get(key) is not None and r.get(qkey) is not None]
            if not points:
                continue
            labels = [_label(r, rows) for r in points] if qkey == quality[0][0] else [""] * len(points)
            labelled_scatter(ax, [r[key] / scale for r in points], [r[qkey] for r in points], labels, color=color,
                             marker=marker, legend=qlabel if classifier else None)
            drawn = True
        if not drawn:
            notes.append(f"{xlabel} against {y_name}: not drawn (not measured for any model).")
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score on the val split (higher is better)" if classifier else "perplexity (lower is better)")
        ax.set_title(f"{name} against {'accuracy and macro-F1' if classifier else 'perplexity'}")
        if classifier:
            ax.legend()
        title = f"{'Size' if name == 'size' else 'Latency'} against {'accuracy and macro-F1' if classifier else 'perplexity'}"
        plots.append(Plot(title, save_png(fig, files.plot(f"{name}-vs-{y_name}")), caption))
    return plots, notes


def compare_facts(report: dict[str, Any], *, classifier: bool) -> list[tuple[str, str]]:
    scored = f"{report['examples']:,} texts" if classifier else f"{report['tokens']:,} tokens"
    return [("models", str(len(report["rows"]))), ("scored on", f"{report['source']}, {scored}")]


def _table(report: dict[str, Any], *, classifier: bool) -> Table:
    from llmctl.training.memory import human_bytes

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = report["rows"]
    if classifier:
        header = ["model", "backend", "accuracy", "macro-F1", "size", "forward ms", "batch"]
        body = [[r["name"], r["backend"], num(r["accuracy"], ".4f"), num(r["macro_f1"], ".4f"), human_bytes(r["size_bytes"]),
                 num(r["forward_ms"], ".2f"), "-" if r["forward_batch"] is None else f"{r['forward_batch']}x{r['forward_tokens']}"]
                for r in rows]
    else:
        header = ["model", "backend", "perplexity", "Δ%", "size", "forward ms", "gen tok/s"]
        body = [[r["name"], r["backend"], num(r["perplexity"], ".3f"), num(r.get("perplexity_change_pct"), "+.2f"),
                 human_bytes(r["size_bytes"]), num(r["forward_ms"], ".2f"), num(r["generate_tokens_per_s"], ".0f")] for r in rows]
    return Table("Models", header, body, numeric={2, 3, 4, 5, 6})


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
        notes=notes,
        tables=[_table(report, classifier=classifier)],
    )
    write_page(files.html, page)
    return {
        "kind": "compare",
        "task": "classifier" if classifier else "lm",
        **report,
        "files": files.listing(plots),
    }
