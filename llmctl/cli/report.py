"""`llmctl report`: a self-contained report.html and PNG plots of a run, a study, or a compare of model dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from llmctl.cli.output import err_console, out_console, print_json, reporting_errors, say
from llmctl.errors import LlmctlError

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
        kind = _kind(paths)
        if kind != "compare":
            given = [flag for flag, used in (("--data", data is not None), ("--max-tokens", max_tokens is not None)) if used]
            if given:
                raise LlmctlError(f"{', '.join(given)}: for a compare of model dirs; {paths[0]} is a {kind} dir.")
        if kind == "run":
            from llmctl.reporting.runs import report_run, run_facts

            result = report_run(paths[0], out)
            _print_facts(f"run {paths[0]}", run_facts(result), json_out)
        elif kind == "study":
            from llmctl.reporting.studies import report_study, study_facts

            result = report_study(paths[0], out)
            _print_facts(f"study {paths[0]}", study_facts(result), json_out)
        else:
            result = _compare(paths, out, data, max_tokens or 65536, json_out)
        files = result["files"]
        say(f"wrote {files['html']} and {len(files['plots'])} plots beside it")
        if json_out:
            print_json(result)


def _kind(paths: list[Path]) -> str:
    """"run", "study" or "compare", refusing a path that is none of them (before any work)."""
    from llmctl.artifacts import ExportDir, ModelDir, RunDir
    from llmctl.models.loading import backend_of
    from llmctl.reporting.studies import is_study_dir

    if len(paths) > 1:
        for path in paths:
            try:
                backend_of(path)  # says what a path is if it is not a model or export dir (a run dir: use its model/)
            except LlmctlError as e:
                raise LlmctlError(f"several paths are compared as model dirs, but {e.message}") from None
        return "compare"
    path = paths[0]
    if not path.exists():
        raise LlmctlError(f"{path}: no such directory; give a run dir, a study dir or model dirs to compare.")
    if not path.is_dir():
        raise LlmctlError(f"{path}: a file; give the run dir that holds it (runs/<name>/), a study dir or model dirs to compare.")
    run = RunDir(path)
    if run.metrics.exists() or run.recipe.is_file():
        return "run"
    if is_study_dir(path):
        return "study"
    if ExportDir(path).is_export() or ModelDir(path).config.is_file():
        return "compare"
    raise LlmctlError(
        f"{path}: not a run dir (metrics.jsonl, as `llmctl train` writes), a study dir (study.db, summary.json, as "
        "`llmctl tune` writes), nor a model or export dir to profile."
    )


def _compare(paths: list[Path], out: Path | None, data: Path | None, max_tokens: int, json_out: bool) -> dict[str, Any]:
    """Profile the dirs exactly as `eval --compare` does, then draw the figures."""
    from llmctl.cli import eval as eval_cmd
    from llmctl.reporting.compare import report_compare
    from llmctl.reporting.layout import next_compare_dir

    classifiers = [eval_cmd._is_classifier(path) for path in paths]
    if any(classifiers) and not all(classifiers):
        mixed = [str(p) for p, c in zip(paths, classifiers) if c]
        raise LlmctlError(f"{', '.join(mixed)}: classifiers; a compare takes only classifiers or only language models.")
    out_dir = out or next_compare_dir()
    if all(classifiers):
        report = eval_cmd.run_classifier_compare(paths, data)
        table = eval_cmd.classifier_compare_table(report)
    else:
        report = eval_cmd.run_compare(paths, data, [], "val", max_tokens)
        table = eval_cmd.compare_table(report)
    (err_console if json_out else out_console).print(table)
    return report_compare(report, out_dir, classifier=all(classifiers))


def _print_facts(title: str, facts: list[tuple[str, str]], json_out: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), box=None, show_header=False, title_justify="left", title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    for label, value in facts:
        table.add_row(escape(label), escape(value))
    (err_console if json_out else out_console).print(table)
