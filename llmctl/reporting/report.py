"""`llmctl report` as one importable call: a run dir, a study dir, or model dirs profiled as `eval
--compare` profiles them, each drawn into report.html and PNG plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError
from llmctl.progress import Progress


@dataclass
class ReportOutcome:
    """What `report` wrote (`result`: what --json prints) and what a person reads of it: the summary lines
    of a run or a study under `title`, or the compare as `eval --compare` shows it (`compared`)."""

    result: dict[str, Any]
    title: str | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)
    compared: Any = None  # an EvalOutcome


def make_report(paths: list[Path], out: Path | None = None, data: Path | None = None, max_tokens: int | None = None,
                progress: Progress | None = None) -> ReportOutcome:
    """Report on a run dir, a study dir, or several model dirs (compared); LlmctlError for bad input."""
    kind = kind_of(paths)
    if kind != "compare":
        given = [flag for flag, used in (("--data", data is not None), ("--max-tokens", max_tokens is not None)) if used]
        if given:
            raise LlmctlError(f"{', '.join(given)}: for a compare of model dirs; {paths[0]} is a {kind} dir.")
    if kind == "run":
        from llmctl.reporting.runs import report_run, run_facts
        from llmctl.tasks import task_of

        result = report_run(paths[0], out)
        return ReportOutcome(result, f"run {paths[0]}", run_facts(result, task_of(paths[0]).reporting.RUN))
    if kind == "study":
        from llmctl.reporting.studies import report_study, study_facts

        result = report_study(paths[0], out)
        return ReportOutcome(result, f"study {paths[0]}", study_facts(result))
    return _compare(paths, out, data, max_tokens, progress)


def kind_of(paths: list[Path]) -> str:
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


def _compare(paths: list[Path], out: Path | None, data: Path | None, max_tokens: int | None,
             progress: Progress | None) -> ReportOutcome:
    """Profile the dirs exactly as `eval --compare` does, then draw the figures."""
    from llmctl.evaluation.request import EvalRequest
    from llmctl.evaluation.targets import model_task, one_evaluation
    from llmctl.reporting.compare import report_compare
    from llmctl.reporting.layout import next_compare_dir

    evaluation = one_evaluation(paths)
    compared = evaluation.compare(EvalRequest(list(paths), compare=True, data=data, max_tokens=max_tokens), progress)
    result = report_compare(compared.report, out or next_compare_dir(), model_task(paths[0]))
    return ReportOutcome(result, compared=compared)
