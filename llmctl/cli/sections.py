"""A step's recipe section, and the paths it reads, for commands that start from a model dir (compress, export).

Defaults come from a recipe given with --recipe, else from the recipe the model was trained with
(its llmctl.json records it); flags the user typed override them. A flag that chooses what the command
does (compress's --prune and --quantize) keeps the recipe's other such choices out: `--quantize int8`
quantizes and does not also prune because the recipe says `prune: 0.3`. Every recipe value that does
apply and differs from the schema's default is reported, so nothing joins in unseen. Errors name the
flag if the user typed it, else the recipe key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from llmctl.artifacts import ModelDir
from llmctl.errors import LlmctlError


def model_recipe_section(model_dir: Path, section: str) -> dict[str, Any]:
    """A section of the recipe a model was trained with, as its llmctl.json records it ({} if none)."""
    try:
        recorded = json.loads(ModelDir(Path(model_dir)).provenance.read_text(encoding="utf-8")).get("recipe") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    found = recorded.get(section)
    return found if isinstance(found, dict) else {}


def inputs_of(model_dir: Path, data: Path | None) -> list[tuple[str, Path]]:
    """What compress and export read, as `(what, path)`: the model dir and the dataset dir that scores it
    (--data, else the one the model's llmctl.json records); an output may be none of them nor lie inside one."""
    inputs = [("the model dir", Path(model_dir))]
    if data is not None:
        return [*inputs, ("--data", Path(data))]
    try:
        recorded = json.loads(ModelDir(Path(model_dir)).provenance.read_text(encoding="utf-8"))["dataset"]["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return inputs
    return [*inputs, ("the model's dataset dir", Path(recorded))] if isinstance(recorded, str) else inputs


@dataclass
class Resolved:
    """A validated section and the recipe values in it that differ from the schema's defaults."""

    options: Any
    from_recipe: list[tuple[str, Any]] = field(default_factory=list)  # (key, value), in the schema's order

    def lines(self, section: str, notes: Mapping[str, str] | None = None) -> list[str]:
        """One line a value, `from recipe: prune 0.3 (compress.prune)`, then what `notes` says of its key."""
        notes = notes or {}
        return [f"from recipe: {key.replace('_', ' ')} {_shown(value)} ({section}.{key}){notes.get(key, '')}"
                for key, value in self.from_recipe]


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def resolve_section(
    model_dir: Path,
    recipe: Path | None,
    section: str,
    flags: dict[str, Any],
    flag_names: dict[str, str],
    *,
    actions: tuple[str, ...] = (),
    applies: Mapping[str, Callable[[Any], bool]] | None = None,
) -> Resolved:
    """The validated `section` (compress, export) for `model_dir`: recipe defaults, then `flags` (the flags typed).

    `actions` are the keys that choose what the command does: when `flags` names any of them, the recipe's
    values for the others are not used. `applies[key](options)` says whether a recipe value matters for the
    options resolved (a pruning method without pruning does not), so only those are reported.
    """
    from pydantic import ValidationError

    from llmctl.config.schema import Recipe

    if recipe is not None:
        from llmctl.config import load_recipe

        base = getattr(load_recipe(recipe, []), section).model_dump()
    else:
        base = model_recipe_section(model_dir, section)
    if any(key in flags for key in actions):
        base = {k: v for k, v in base.items() if k not in actions}
    model_cls = Recipe.model_fields[section].annotation
    try:
        options = model_cls.model_validate({**base, **flags})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            where = flag_names.get(key, f"{section}.{key}") if key in flags else f"{section}.{key}"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}, got {err.get('input')!r}")
        raise LlmctlError("; ".join(problems) + ".") from None
    defaults = model_cls()
    applies = applies or {}
    from_recipe = [
        (key, getattr(options, key)) for key in model_cls.model_fields
        if key in base and key not in flags and getattr(options, key) != getattr(defaults, key)
        and applies.get(key, lambda _: True)(options)
    ]
    return Resolved(options, from_recipe)
