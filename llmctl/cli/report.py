"""`llmctl report`: a self-contained report.html and PNG plots of a run, a study, or a compare of model dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from llmctl.cli.output import err_console, out_console, print_json, reporting_errors, say

EPILOG = (
    "Examples: llmctl report runs/tiny-gpt  |  llmctl report runs/tiny-gpt-tune  |  "
    "llmctl report runs/my/model out/my-int8 out/my-onnx"
)


def report_cli(
    paths: List[Path] = typer.Argument(
        ..., show_default=False,
        help="A run dir (train), a study dir (tune), or model, compressed model and export dirs to compare.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for report.html and the PNGs (default: the run or study dir itself; reports/compare-<n> for a compare)."
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Compare: score this dataset dir's val split instead of the first model's."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Compare of language models: score at most this many val tokens (default 65536)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout: the summary figures and the files written."),
) -> None:
    """Draw what train, tune or eval --compare measured: report.html (images embedded, nothing fetched) and PNGs.

    A run dir: train and val loss against steps and tokens, learning rate, tokens/s, gradient norm (val accuracy/F1 too for classifiers).

    A study dir: optimisation history, parameter importances, parallel coordinates, the trials' learning curves.

    Model dirs: profiled as eval --compare does, then size and latency against perplexity (accuracy and macro-F1 for classifiers).
    """
    with reporting_errors(json_out):
        from llmctl.cli.eval_tables import print_outcome
        from llmctl.cli.progress import WorkProgress
        from llmctl.reporting.report import make_report

        with WorkProgress() as progress:
            outcome = make_report(list(paths), out, data, max_tokens, progress)
        console = err_console if json_out else out_console
        if outcome.compared is not None:
            print_outcome(outcome.compared, console)
        else:
            _print_facts(outcome.title or "", outcome.facts, console)
        files = outcome.result["files"]
        say(f"wrote {files['html']} and {len(files['plots'])} plots beside it")
        if json_out:
            print_json(outcome.result)


def _print_facts(title: str, facts: list[tuple[str, str]], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), box=None, show_header=False, title_justify="left", title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    for label, value in facts:
        table.add_row(escape(label), escape(value))
    console.print(table)
