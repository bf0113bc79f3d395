"""The recipe reference (docs/recipes.md), generated from the schema.

One Markdown table per section (key, type, default, bounds or choices, description), one per
nested section such as train.lora, and for `model` and `data` one per typed config their tag
chooses (model.family, data.task). Regenerate the page with:

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

from llmctl.config.schema import Recipe
from llmctl.config.tagged import TaggedSection, is_section, or_list, section_in

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
    if is_section(tp):
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
        if is_section(type(value)):
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


def _anchor(key: str, title: str) -> str:
    """A link to the heading `title` as GitHub names its anchor."""
    return f"[{key}](#{re.sub(r'[^a-z0-9 _-]', '', title.lower()).replace(' ', '-')})"


def _table(prefix: str, model: Any, seen: dict[Any, tuple[str, str]], suffix: str) -> tuple[list[str], list[tuple[str, Any]]]:
    lines = ["| key | type | default | bounds / choices | description |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        sub = section_in(field.annotation)
        if sub is not None and sub not in seen:
            seen[sub] = (f"{prefix}.{name}", f"{prefix}.{name}{suffix}")
            nested.append((f"{prefix}.{name}", sub))
        type_name = _type_name(field.annotation)
        desc = field.description or ""
        if sub is not None:
            desc += f" Fields: {_anchor(*seen[sub])}."
        lines.append(
            f"| `{name}` | {_cell(type_name)} | {_cell(_default(field))} | {_cell(_bounds(field))} | {_cell(desc)} |"
        )
    return lines, nested


def _section(prefix: str, model: Any, level: int, seen: dict[Any, tuple[str, str]], suffix: str = "",
             title: str | None = None) -> list[str]:
    """The heading, docstring and table of one section, then those of the sections nested in it."""
    out = [f"{'#' * level} {title or prefix + suffix}\n"]
    doc = (model.__doc__ or "").strip()
    if doc and (level > 2 or title):
        out.append(doc + "\n")
    lines, nested = _table(prefix, model, seen, suffix)
    out.append("\n".join(lines) + "\n")
    for key, sub in nested:
        out += _section(key, sub, level + 1, seen, suffix)
    return out


def _tagged(prefix: str, section: type[TaggedSection], seen: dict[Any, tuple[str, str]]) -> list[str]:
    """A section with one typed config per value of its tag: what the tag chooses, then each config."""
    out = [f"## {prefix}\n", f"`{prefix}.{section.tag}` chooses the keys of this section (default "
                             f"`{section.default}`): {section.tag_description}\n"]
    for tags, config in section.choices().items():
        suffix = f" ({section.tag}: {or_list(list(tags))})"
        out += _section(prefix, config, 3, seen, suffix, title=f"{prefix}{suffix}")
    return out


def recipe_reference_markdown() -> str:
    """The whole reference page as Markdown."""
    out = [_INTRO]
    seen: dict[Any, tuple[str, str]] = {}
    for name, field in Recipe.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, TaggedSection):
            out += _tagged(name, section, seen)
        else:
            out += _section(name, section, 2, seen)
    return "\n".join(out)


if __name__ == "__main__":
    print(recipe_reference_markdown(), end="")
