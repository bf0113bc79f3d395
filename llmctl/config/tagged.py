"""A recipe section that holds one of several typed configs, chosen by the value of one key, its tag.

`model` takes one config per family (its tag is `model.family`), `data` one per task (`data.task`).
Pydantic validates such a section as a discriminated union; a section without its tag takes the
default one, so `model: {n_layer: 2}` is a gpt and `data: {}` an lm dataset. The class also lists
every variant's keys in `model_fields` (the tag first, with all its values), which is what the recipe
reference, shell completion and the did-you-mean hints read; calling it (`DataConfig(task="instruct",
...)`) validates keyword arguments into the variant they name.

Pydantic puts the tag into an error's location (`("model", "gpt", "n_layer")`); `untagged_loc` takes it
back out, so an error names the key the recipe wrote (`model.n_layer`).
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter
from pydantic.fields import FieldInfo


class TaggedSection:
    """Subclasses set `tag` (the key), `default` (the tag of a section that names none), `tag_description`
    and `variants` (tag value -> config class, in the order the values are listed)."""

    tag: ClassVar[str]
    default: ClassVar[str]
    tag_description: ClassVar[str]
    variants: ClassVar[dict[str, type[BaseModel]]]
    model_fields: ClassVar[dict[str, FieldInfo]]
    _adapter: ClassVar[TypeAdapter | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag_field = FieldInfo.from_annotated_attribute(
            Literal[tuple(cls.variants)], Field(cls.default, description=cls.tag_description)  # type: ignore[misc]
        )
        merged: dict[str, FieldInfo] = {cls.tag: tag_field}
        for variant in cls.choices().values():
            for name, info in variant.model_fields.items():
                merged.setdefault(name, info)
        cls.model_fields = merged
        cls._adapter = None

    def __new__(cls, **fields: Any) -> Any:  # type: ignore[misc]
        return cls.validate(fields)

    @classmethod
    def validate(cls, value: Any) -> Any:
        """`value` (a mapping, or a config already) validated into the variant its tag names."""
        if cls._adapter is None:
            cls._adapter = TypeAdapter(cls.union())
        return cls._adapter.validate_python(value)

    @classmethod
    def tag_of(cls, value: Any) -> Any:
        """The tag value `value` names (the default when it names none)."""
        if isinstance(value, dict):
            return value.get(cls.tag, cls.default)
        return getattr(value, cls.tag, cls.default)

    @classmethod
    def union(cls) -> Any:
        """The discriminated union pydantic validates the section as."""
        options = tuple(Annotated[variant, Tag(value)] for value, variant in cls.variants.items())
        return Annotated[Union[options], Discriminator(cls.tag_of)]  # type: ignore[valid-type]

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return handler(cls.union())

    @classmethod
    def choices(cls) -> dict[tuple[str, ...], type[BaseModel]]:
        """Each distinct config class with the tag values that choose it: {("rnn", "lstm", "gru"): ...}."""
        grouped: dict[type[BaseModel], list[str]] = {}
        for value, variant in cls.variants.items():
            grouped.setdefault(variant, []).append(value)
        return {tuple(values): variant for variant, values in grouped.items()}

    @classmethod
    def tags_where(cls, keep: typing.Callable[[type[BaseModel]], bool]) -> str:
        """The tag values whose config passes `keep`, as a phrase: "lm or instruct"."""
        return or_list([value for value, variant in cls.variants.items() if keep(variant)])


def has_key(config: Any, path: tuple[Any, ...]) -> bool:
    """Whether `path` (keys and list indices, e.g. ("sources", 0, "label_field")) is a setting of `config`."""
    for part in path:
        if isinstance(part, int):
            continue
        field = config.model_fields.get(part) if is_section(config) else None
        if field is None:
            return False
        config = section_in(field.annotation)
    return True


def or_list(values: list[Any]) -> str:
    """["a"] -> "a", ["a", "b", "c"] -> "a, b or c"."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def is_section(tp: Any) -> bool:
    """Whether annotation `tp` is a recipe section: a config class or a tagged section."""
    return isinstance(tp, type) and (issubclass(tp, BaseModel) or issubclass(tp, TaggedSection))


def section_in(annotation: Any) -> Any:
    """The section an annotation holds (itself, optional, in a list or a dict's values), else None."""
    stack = [annotation]
    while stack:
        tp = stack.pop()
        if is_section(tp):
            return tp
        stack.extend(typing.get_args(tp))
    return None


def untagged_loc(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, Any]:
    """A pydantic error location without the tags a tagged section adds; the config class that holds its
    last key; and the innermost tagged section on the way as (section, the tag value taken, the length of
    the location up to the section's key), or None.

    ("model", "gpt", "n_layer") -> (("model", "n_layer"), GPTModelConfig, (ModelConfig, "gpt", 1)).
    """
    out: list[Any] = []
    holder: Any = root
    tagged: Any = None
    i = 0
    while i < len(loc):
        part = loc[i]
        i += 1
        out.append(part)
        if isinstance(part, int):
            continue
        if i == len(loc):
            break
        field = holder.model_fields.get(part) if holder is not None else None
        section = section_in(field.annotation) if field is not None else None
        if isinstance(section, type) and issubclass(section, TaggedSection) and loc[i] in section.variants:
            tagged, section = (section, loc[i], len(out)), section.variants[loc[i]]
            i += 1
        holder = section
    return tuple(out), holder, tagged
