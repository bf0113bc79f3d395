"""The dirs `llmctl eval` and `llmctl report` are given: what each is (its task, by the registry) and
whether an export dir's figures can be trusted."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from llmctl.artifacts import ExportDir
from llmctl.errors import LlmctlError
from llmctl.progress import Progress
from llmctl.tasks import Task, task_of


def model_task(path: Path) -> Task:
    """The task of a model, export or HF dir, refusing anything else by what it is (a run dir, a dataset dir)."""
    from llmctl.models.loading import backend_of

    backend_of(path)
    return task_of(path)


def one_evaluation(paths: list[Path]) -> ModuleType:
    """The evaluation module every dir of a compare shares (an instruction-tuned model is compared as a
    language model); refuses dirs of tasks evaluated apart."""
    tasks = [model_task(path) for path in paths]
    first = tasks[0]
    others = [(path, task) for path, task in zip(paths, tasks) if task.modules["evaluation"] != first.modules["evaluation"]]
    if others:
        listed = ", ".join(f"{path} ({task.name})" for path, task in others)
        raise LlmctlError(f"{listed}: another kind of model than {paths[0]} ({first.name}); a compare takes models "
                          "of one kind: only classifiers or only language models.")
    return first.evaluation


def warn_if_unverified(path: Path, progress: Progress) -> None:
    """An export dir whose parity check failed still loads; say so before its figures are trusted."""
    layout = ExportDir(Path(path))
    if not layout.is_export():
        return
    try:
        verification = json.loads(layout.manifest.read_text(encoding="utf-8")).get("verification") or {}
    except (OSError, ValueError):
        return
    if verification.get("passed") is False:
        progress.note(f"warning: {path} failed its parity check at export: {verification.get('failure')}")
