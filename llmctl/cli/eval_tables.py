"""How `llmctl eval` shows its reports to a person: one printer per view an evaluation module names
(`EvalOutcome.view`), rich tables on stdout, what was written on stderr. `llmctl report` prints a
compare with the same tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from llmctl.cli.output import add_disturbed_caption, out_console, say, timed

if TYPE_CHECKING:
    from rich.table import Table


def print_outcome(outcome: Any, console: Any = None) -> None:
    """Print an EvalOutcome's report in its view (a view no printer knows: its figures, one per line)."""
    PRINTERS.get(outcome.view, print_figures)(outcome.report, console or out_console)


def print_figures(report: dict[str, Any], console: Any) -> None:
    from rich.markup import escape

    for key, value in report.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            console.print(f"{escape(key)}: {escape(str(value))}")


def print_lm_report(report: dict, console: Any) -> None:
    """Loss, perplexity, bits per byte (and against the unigram baseline) as a table, then the samples."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report['model_dir']} on {report['source']}", box=None, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{report['loss']:.4f}")
    table.add_row("perplexity", f"{report['perplexity']:.3f}")
    table.add_row("bits per byte", f"{report['bits_per_byte']:.4f}")
    table.add_row("tokens scored", f"{report['tokens']:,}")
    if report.get("unigram_perplexity"):
        u = report["unigram_perplexity"]
        table.add_row("unigram perplexity", f"{u:.3f}")
        table.add_row("model / unigram", f"{report['perplexity'] / u:.3f}")
    console.print(table)
    if report["samples"]:
        say(_decoding_line(report["decoding"]))
    for s in report["samples"]:
        console.print(f"\n[bold]{escape(s['prompt'])}[/]{escape(s['completion'])}", soft_wrap=True)


def _decoding_line(decoding: dict) -> str:
    if decoding["mode"] == "greedy":
        return "samples: greedy (the likeliest token each step; --temperature 0.8 samples instead)"
    parts = [f"temperature {decoding['temperature']:g}"]
    parts += [f"top-k {decoding['top_k']}"] if decoding.get("top_k") else []
    parts += [f"top-p {decoding['top_p']:g}"] if decoding.get("top_p") else []
    return f"samples: sampled at {', '.join(parts)}, seed {decoding['seed']} (--temperature 0 for greedy)"


def compare_table(report: dict) -> Table:
    from rich.table import Table

    from llmctl.units import human_bytes

    table = Table(title=f"on {report['source']}, {report['tokens']:,} tokens", header_style="bold", box=None, title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("backend", no_wrap=True)
    for col in ("perplexity", "Δ%", "size", "forward ms", "gen tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        delta = r["perplexity_change_pct"]
        table.add_row(
            r["name"], r["backend"], f"{r['perplexity']:.3f}", "-" if delta is None else f"{delta:+.2f}",
            human_bytes(r["size_bytes"]), timed(f"{r['forward_ms']:.2f}", r), timed(f"{r['generate_tokens_per_s']:.0f}", r),
        )
    add_disturbed_caption(table, report["rows"])
    return table


def print_classifier_report(report: dict, console: Any) -> None:
    """The headline figures, the per-class report and the confusion matrix; what --predict labelled; the files."""
    if "accuracy" in report:
        console.print(
            f"{report['model_dir']} ({report['backend']}) on {report['source']}: {report['examples']:,} examples, "
            f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro']['f1']:.4f}"
        )
        console.print(per_class_table(report))
        console.print(confusion_table(report))
    if "predicted" in report:
        p = report["predicted"]
        scored = f" (accuracy {p['accuracy']:.4f} against its labels)" if "accuracy" in p else ""
        console.print(f"labelled {p['examples']:,} texts of {p['file']}{scored}")
    for path in report["files"].values():
        say(f"wrote {path}")


def classifier_compare_table(report: dict) -> Table:
    from rich.table import Table

    from llmctl.units import human_bytes

    table = Table(title=f"on {report['source']}, {report['examples']:,} texts", header_style="bold", box=None,
                  title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("backend", no_wrap=True)
    for col in ("accuracy", "macro-F1", "size", "forward ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        ms = "-" if r["forward_ms"] is None else f"{r['forward_ms']:.2f} ({r['forward_batch']}x{r['forward_tokens']})"
        table.add_row(r["name"], r["backend"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", human_bytes(r["size_bytes"]),
                      timed(ms, r))
    add_disturbed_caption(table, report["rows"])
    return table


def confusion_table(metrics: dict[str, Any]) -> Table:
    """The confusion matrix as a rich table: one row per true label, one column per predicted label."""
    from rich.table import Table
    from rich.text import Text

    title = "Confusion matrix (rows: true labels)"
    table = Table(title=title, min_width=len(title) + 2)  # a title wrapped over a narrow matrix misreads
    table.add_column("true \\ predicted", style="bold")
    for name in metrics["labels"]:
        table.add_column(Text(name), justify="right")
    for i, (name, row) in enumerate(zip(metrics["labels"], metrics["confusion"])):
        cells = [Text(str(c), style="bold green" if j == i else "") for j, c in enumerate(row)]
        table.add_row(Text(name), *cells)
    return table


def per_class_table(metrics: dict[str, Any]) -> Table:
    """Precision, recall, F1 and support per class, then accuracy, macro and weighted averages."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Classification report ({metrics['examples']} examples)")
    table.add_column("label")
    for column in ("precision", "recall", "f1", "support"):
        table.add_column(column, justify="right")
    for name, m in metrics["per_class"].items():
        table.add_row(Text(name), f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    table.add_section()
    n = str(metrics["examples"])
    table.add_row("accuracy", "", "", f"{metrics['accuracy']:.4f}", n, style="bold")
    for row in ("macro", "weighted"):
        m = metrics[row]
        table.add_row(f"{row} avg", f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", n)
    return table


def _print_table(table_of: Callable[[dict], Any]) -> Callable[[dict, Any], None]:
    return lambda report, console: console.print(table_of(report))


# view -> printer(report, console); the views are the evaluation modules' VIEW and COMPARE_VIEW.
PRINTERS: dict[str, Callable[[dict, Any], None]] = {
    "lm": print_lm_report,
    "lm-compare": _print_table(compare_table),
    "classification": print_classifier_report,
    "classification-compare": _print_table(classifier_compare_table),
}
