"""A step's recipe section for commands that start from a model dir (compress, export).

Defaults come from a recipe given with --recipe, else from the recipe the model was trained with
(its llmctl.json records it); flags the user typed override them. Errors name the flag if the user
typed it, else the recipe key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError


def model_recipe_section(model_dir: Path, section: str) -> dict[str, Any]:
    """A section of the recipe a model was trained with, as its llmctl.json records it ({} if none)."""
    try:
        recorded = json.loads((Path(model_dir) / "llmctl.json").read_text(encoding="utf-8")).get("recipe") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    found = recorded.get(section)
    return found if isinstance(found, dict) else {}


def resolve_section(model_dir: Path, recipe: Path | None, section: str, flags: dict[str, Any], flag_names: dict[str, str]) -> Any:
    """The validated `section` (compress, export) for `model_dir`: recipe defaults, then `flags`."""
    from pydantic import ValidationError

    from llmctl.config.schema import Recipe

    if recipe is not None:
        from llmctl.config import load_recipe

        base = getattr(load_recipe(recipe, []), section).model_dump()
    else:
        base = model_recipe_section(model_dir, section)
    model_cls = Recipe.model_fields[section].annotation
    try:
        return model_cls.model_validate({**base, **flags})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            where = flag_names.get(key, f"{section}.{key}") if key in flags else f"{section}.{key}"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}, got {err.get('input')!r}")
        raise LlmctlError("; ".join(problems) + ".") from None
