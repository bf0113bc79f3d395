"""The recipe reference (docs/recipes.md), generated from the schema.

One Markdown table per section (key, type, default, bounds or choices, description), and
one per nested section such as train.lora. Regenerate the page with:

    python -m llmctl.config.reference > docs/recipes.md
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llmctl.config.schema import Recipe, _Section

REGENERATE = "python -m llmctl.config.reference > docs/recipes.md"

_INTRO = f"""\
# Recipe reference

<!-- Generated from llmctl/config/schema.py; do not edit. Regenerate with: {REGENERATE} -->

A recipe is one YAML file with a section per step: `run`, `data`, `model`, `train`, `tune`,
`compress` and `export`. Every key is optional; a missing key takes the default below. Any key
can be set on the command line as `section.key=value` (e.g. `train.lr=3e-4`,
`train.lora.rank=16`). `llmctl recipes validate my.yaml` checks a recipe and prints it
resolved; `llmctl recipes schema` prints the same information as JSON Schema.
"""


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, _Section)


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """A short, readable name for an annotation: `int | auto | null`, `list[str]`, `float, float`."""
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in _args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = _args(tp)
        return "str" if len(values) > 1 else str(values[0])
    if origin is list:
        return f"list[{_type_name(_args(tp)[0])}]"
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in _args(tp))}]"
    if origin is dict:
        key, value = _args(tp)
        return f"map {_type_name(key)} → {_type_name(value)}"
    if tp is Any:
        return "any"
    if _is_section(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _literal_choices(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return list(_args(tp))
    if _is_union(tp):
        return [c for a in _args(tp) for c in _literal_choices(a)]
    return []


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, BaseModel):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.model_dump(exclude_defaults=True).items()) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:_}".replace("_", ",") if abs(v) >= 10_000 else str(v)
    return str(v)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if _is_section(type(value)):
            return "(section)"
        return f"`{_value(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{_value(field.default)}`"


def _bounds(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(m, attr, None)
            if isinstance(m, annotated_types.BaseMetadata) and bound is not None:
                parts.append(f"{sign} {_value(bound)}")
    choices = _literal_choices(field.annotation)
    if choices:
        parts.append(" | ".join(f"`{_value(c)}`" for c in choices))
    return ", ".join(parts)


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, and a `<` before a letter outside code spans as an
    entity (GitHub would take runs/<name>/ for an HTML tag and hide it)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i])
    return "`".join(parts)


def _nested(field: FieldInfo) -> type[_Section] | None:
    """The section a field holds: itself, in a list, in a dict's values, or optional."""
    stack = [field.annotation]
    while stack:
        tp = stack.pop()
        if _is_section(tp):
            return tp
        stack.extend(_args(tp))
    return None


def _anchor(key: str) -> str:
    return f"[{key}](#{key.replace('.', '')})"


def _table(
    prefix: str, model: type[_Section], seen: dict[type[_Section], str]
) -> tuple[list[str], list[tuple[str, type[_Section]]]]:
    lines = ["| key | type | default | bounds / choices | description |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        sub = _nested(field)
        if sub is not None and sub not in seen:
            seen[sub] = f"{prefix}.{name}"
            nested.append((f"{prefix}.{name}", sub))
        type_name = _type_name(field.annotation)
        desc = field.description or ""
        if sub is not None:
            desc += f" Fields: {_anchor(seen[sub])}."
        lines.append(
            f"| `{name}` | {_cell(type_name)} | {_cell(_default(field))} | {_cell(_bounds(field))} | {_cell(desc)} |"
        )
    return lines, nested


def recipe_reference_markdown() -> str:
    """The whole reference page as Markdown."""
    out = [_INTRO]
    pending: list[tuple[str, type[_Section]]] = [
        (name, field.annotation) for name, field in Recipe.model_fields.items()  # type: ignore[misc]
    ]
    seen: dict[type[_Section], str] = {}
    while pending:
        prefix, model = pending.pop(0)
        lines, nested = _table(prefix, model, seen)
        doc = (model.__doc__ or "").strip()
        heading = "###" if "." in prefix else "##"
        out.append(f"{heading} {prefix}\n")
        if doc and "." in prefix:
            out.append(doc + "\n")
        out.append("\n".join(lines) + "\n")
        # Nested sections follow their parent section directly.
        pending[0:0] = nested
    return "\n".join(out)


if __name__ == "__main__":
    print(recipe_reference_markdown(), end="")
