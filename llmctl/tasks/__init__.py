"""The task registry: `task_named(name)` for a recipe's `data.task`, `task_of(path)` for an artifact.

Every artifact llmctl writes records its task under one key, `task` (meta.json of a dataset dir,
config.json of a model dir, export.json of an export dir); `task_of` reads it, and reads older dirs
written before that key existed the way they were told apart then, in this one place.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError
from llmctl.tasks.base import STAGES, Task

# name -> the package whose TASK it is; a new task is one more line here and its package.
_PACKAGES = {
    "lm": "llmctl.tasks.lm",
    "classification": "llmctl.tasks.classification",
    "instruct": "llmctl.tasks.instruct",
}

__all__ = ["STAGES", "Task", "task_names", "task_named", "task_of", "task_of_config"]


def task_names() -> list[str]:
    return list(_PACKAGES)


def task_named(name: str) -> Task:
    """The task called `name` (a recipe's `data.task`, an artifact's `task` key)."""
    package = _PACKAGES.get(name)
    if package is None:
        raise LlmctlError(f"unknown task {name!r}; known tasks: {', '.join(_PACKAGES)}.")
    return importlib.import_module(package).TASK


def task_of_config(config: dict[str, Any]) -> Task:
    """The task of a model from its config.json (a dict): its `task` key, else, for model dirs written
    before that key, a classifier when it has `num_classes`, else a language model."""
    name = config.get("task")
    if not isinstance(name, str):
        name = "classification" if config.get("num_classes") is not None else "lm"
    return task_named(name)


def task_of(path: str | Path) -> Task:
    """The task of the artifact at `path`: a dataset dir, a model dir, an export dir, a run dir (its
    model dir, else its recipe), or a Hugging Face dir (a language model)."""
    path = Path(path)
    for name in ("meta.json", "export.json"):
        found = _read(path / name)
        if found is not None:
            return task_named(found.get("task") or "lm")
    config = _read(path / "config.json")
    if config is not None:
        return task_of_config(config) if "family" in config else task_named("lm")  # no family: a Hugging Face dir
    if (path / "model" / "config.json").is_file():
        return task_of(path / "model")
    if (path / "recipe.yaml").is_file():
        import yaml

        recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
        return task_named(((recipe.get("data") or {}).get("task")) or "lm")
    raise LlmctlError(f"{path}: not an llmctl dataset, model, export or run dir; cannot tell its task.")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
