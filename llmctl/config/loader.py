"""Load a recipe: YAML -> dotted overrides -> one pydantic validation, errors naming file:line:key."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmctl.config.schema import ModelConfig, Recipe
from llmctl.config.tagged import has_key, is_section, or_list, section_in, untagged_loc
from llmctl.errors import LlmctlError

COMMAND_LINE = "command line"


def _line_map(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text (list items as key[i])."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}[{i}]"
            lines[key] = item.start_mark.line + 1
            lines.update(_line_map(item, key))
    return lines


def _refuse_duplicate_keys(node: yaml.Node | None, source: str, prefix: str = "") -> None:
    """Refuse a mapping that names a key twice (YAML loaders silently keep the last one), naming both lines."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in first_line and key_node.tag != "tag:yaml.org,2002:merge":
                raise LlmctlError(
                    f"{source}:{line} {key}: given twice (first at line {first_line[key_node.value]}); "
                    "YAML would silently keep the last one: keep one of them.",
                    kind="recipe",
                )
            first_line.setdefault(key_node.value, line)
            _refuse_duplicate_keys(value_node, source, key)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{prefix}[{i}]")


def parse_recipe_text(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse recipe YAML into a dict plus the line of every dotted key; a key given twice is refused."""
    try:
        node = yaml.compose(text)
        _refuse_duplicate_keys(node, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise LlmctlError(f"{where}: not valid YAML ({problem}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LlmctlError(f"{source}:1: a recipe is a mapping of sections (data, model, train, ...), got {type(data).__name__}.")
    return data, _line_map(node) if node is not None else {}


def _takes_plain_string(parts: list[str]) -> bool:
    """Whether the recipe key `parts` (e.g. ["run", "name"]) holds a string, so any text is a fine value."""
    model: Any = Recipe
    for part in parts:
        field = model.model_fields.get(part) if is_section(model) else None
        if field is None:
            return False
        options = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next((o for o in options if is_section(o)), None)
        if model is None:
            return str in options
    return False


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise LlmctlError(
            f"override {item!r}: expected section.key=value, e.g. train.lr=3e-4 or model.n_layer=2."
        )
    parts = key.split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        # Text YAML cannot read stays a string (a glob such as *.txt, a Jinja template), unless it opens
        # a YAML list or mapping for a key that holds no string: then it is a list left broken.
        if raw.lstrip().startswith(("[", "{")) and not _takes_plain_string(parts):
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            opening = raw.lstrip()[0]
            shape = "list, e.g. [a, b]" if opening == "[" else "mapping, e.g. {key: value}"
            raise LlmctlError(
                f"{COMMAND_LINE} {key}: not valid YAML ({problem}); a value starting with {opening} is a YAML "
                f"{shape} (quote the whole argument for the shell: \"{key}=...\").",
                kind="recipe",
            ) from None
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], set[str]]:
    """Set each `section.key=value` (value parsed as YAML, so types coerce) into a copy of `data`.

    Returns the new dict and the dotted keys the command line set.
    """
    import copy

    out = copy.deepcopy(data)
    keys: set[str] = set()
    for item in overrides:
        parts, value = _parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise LlmctlError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section."
                )
            node = child
        node[parts[-1]] = value
        keys.add(".".join(parts))
    return out, keys


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        op = bounds[kind]
        limit = next(iter(ctx.values()), "?")
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {op} {limit}, got {got!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')}, got {got!r}"
    if kind == "model_type":
        return f"must be a section of key: value lines, got {got!r}"
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return f"must be an integer, got {got!r}"
    if kind in {"float_parsing", "float_type"}:
        return f"must be a number, got {got!r}"
    if kind in {"bool_parsing", "bool_type"}:
        return f"must be true or false, got {got!r}"
    if kind in {"string_type"}:
        return f"must be a string, got {got!r}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = err.get("msg", "invalid")
    return msg.removeprefix("Value error, ")


def _did_you_mean(holder: Any, loc: tuple[Any, ...]) -> str:
    """The close key of `holder` (the config class the unknown key was given in), or its keys."""
    if not is_section(holder):
        return ""
    name = str(loc[-1])
    fields = list(holder.model_fields)
    # A key that extends or shortens a real one (lrate, lr_) beats spelling distance (lrate ~ strategy).
    affixed = sorted((f for f in fields if len(f) > 1 and (name.startswith(f) or f.startswith(name))), key=len, reverse=True)
    close = affixed[:1] or difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
    parent = _dotted(loc[:-1])
    if close:
        return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    return f"; expected one of: {', '.join(holder.model_fields)}"


def _unknown_tag(err: dict[str, Any], holder: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
    """A tagged section's tag (model.family, data.task) that names none of its configs: its key and problem."""
    section = section_in(holder.model_fields[loc[-1]].annotation)
    given = err["input"].get(section.tag) if isinstance(err["input"], dict) else err["input"]
    return (*loc, section.tag), f"must be one of {or_list([repr(v) for v in section.variants])}, got {given!r}"


def _key_of_another_variant(tagged: Any, loc: tuple[Any, ...]) -> str | None:
    """For a key given in a tagged section (model, data) whose chosen config lacks it but another has it:
    what it is for and the tag to set, e.g. `data.chat_template renders instruction data: it needs
    data.task: instruct`."""
    if tagged is None:
        return None
    section, chosen, depth = tagged
    for tags, config in section.choices().items():
        if chosen not in tags and has_key(config, loc[depth:]):
            return f"{_dotted(loc)} {config.purpose}: it needs {_dotted(loc[:depth])}.{section.tag}: {or_list(list(tags))}"
    return None


def _parent_key(key: str) -> str:
    """train.log_with[0] -> train.log_with -> train -> "" (a list item's parent is its list)."""
    if key.endswith("]") and "[" in key:
        return key.rsplit("[", 1)[0]
    return key.rsplit(".", 1)[0] if "." in key else ""


def _where(key: str, source: str, lines: dict[str, int], overridden: set[str]) -> str:
    probe = key
    while probe:
        if probe in overridden:
            return COMMAND_LINE
        if probe in lines:
            return f"{source}:{lines[probe]}"
        if any(k.startswith((probe + ".", probe + "[")) for k in overridden):
            return COMMAND_LINE
        probe = _parent_key(probe)
    return source


def validate_recipe(
    data: dict[str, Any], source: str, lines: dict[str, int] | None = None, overridden: set[str] | None = None
) -> Recipe:
    """Validate a recipe dict once; on failure raise LlmctlError listing `file:line key: problem` lines."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc, holder, tagged = untagged_loc(Recipe, tuple(err["loc"]))
            if err["type"] == "union_tag_invalid":
                loc, text = _unknown_tag(err, holder, loc)
            else:
                text = _describe(err)
            key = _dotted(loc) or "(top level)"
            where = _where(key, source, lines or {}, overridden or set())
            other = _key_of_another_variant(tagged, loc) if err["type"] == "extra_forbidden" else None
            if other is not None:
                problems.append(f"{where} {other}")
                continue
            # A check of a mapping's keys (tune.space) names the key first: point at its own line.
            head, sep, rest = text.partition(": ")
            if sep and f"{key}.{head}" in (lines or {}):
                key, text = f"{key}.{head}", rest
                where = _where(key, source, lines or {}, overridden or set())
            if err["type"] == "extra_forbidden":
                text += _did_you_mean(holder, loc)
            problems.append(f"{where} {key}: {text}")
        if len(problems) == 1:
            message = problems[0] if problems[0].endswith(("?", ".")) else f"{problems[0]}."
            raise LlmctlError(message, kind="recipe") from None
        listing = "\n  ".join(problems)
        raise LlmctlError(f"recipe {source} has {len(problems)} problems:\n  {listing}", kind="recipe") from None


class _ModelDirEntries(BaseModel):
    """The entries a model dir's config.json holds beyond the recipe's model section (classifiers)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    task: str | None = None
    num_classes: int | None = Field(None, ge=2)
    pad_id: int | None = Field(None, ge=0)
    max_len: int | None = Field(None, ge=1)
    labels: list[str] | None = None


def check_model_config(config: dict[str, Any], source: str) -> None:
    """Refuse a model dir's config.json whose entries do not have the recipe schema's types and bounds
    (strictly: "2" is not an integer), naming the file and the key, before a model is built from it."""
    family = config.get("family", ModelConfig.default)
    section = ModelConfig.variants.get(family) if isinstance(family, str) else None
    if section is None:
        raise LlmctlError(
            f"{source} family: must be one of {or_list([repr(f) for f in ModelConfig.variants])}, got {family!r}; this "
            "config.json is damaged or was edited by hand: restore it, or write the model dir again."
        )
    fields = {k: v for k, v in config.items() if k in section.model_fields}
    for schema, entries in ((section, fields), (_ModelDirEntries, config)):
        try:
            schema.model_validate(entries, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            key = _dotted(tuple(err["loc"])) or "(the model's shape)"
            raise LlmctlError(
                f"{source} {key}: {_describe(err)}; this config.json is damaged or was edited by hand: restore it, "
                "or write the model dir again."
            ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; run.name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        hint = " (shipped recipes: `llmctl recipes ls`; copy one with `llmctl recipes cp NAME PATH`)"
        raise LlmctlError(f"{path}: no such recipe file{hint}.", kind="recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmctlError(f"{path}: not UTF-8 at byte {e.start}.", kind="recipe") from None
    data, lines = parse_recipe_text(text, str(path))
    data, overridden = apply_overrides(data, overrides or [])
    run = data.setdefault("run", {}) if isinstance(data.get("run", {}), dict) else data["run"]
    if isinstance(run, dict) and not run.get("name"):
        run["name"] = path.stem
    take_hf_checkpoint(data, str(path), lines, overridden)
    return validate_recipe(data, str(path), lines, overridden)


def take_hf_checkpoint(data: dict[str, Any], source: str, lines: dict[str, int], overridden: set[str]) -> None:
    """When model.init_from names a Hugging Face checkpoint, fill the model section's shape from its
    config.json and the data section's tokenizer (and end-of-text token) from its tokenizer files, in place.

    The checkpoint's config and weights are checked here, so a bad one stops every command before work.
    A model-section shape key that the command line set to another value is refused, not replaced.
    """
    model = data.get("model")
    init = model.get("init_from") if isinstance(model, dict) else None
    if not isinstance(init, str) or not init:
        return
    from llmctl.models.hf import hf_recipe_updates, is_hf_checkpoint

    where = f"{_where('model.init_from', source, lines, overridden)} model.init_from"
    if not is_hf_checkpoint(init):
        if Path(init).is_dir() and not (Path(init) / "config.json").is_file():
            raise LlmctlError(
                f"{where}: {init} has no config.json; expected an llmctl model dir (runs/<name>/model) or a Hugging "
                "Face model dir (config.json, *.safetensors, tokenizer.json)."
            )
        return  # an llmctl model dir: the trainer checks it against the model section
    sections = data.setdefault("data", {}) if data.get("data") is None else data["data"]
    if not isinstance(sections, dict):
        return  # validation reports the data section
    context = model.get("context_length")
    if not isinstance(context, int) or isinstance(context, bool):
        context = ModelConfig.model_fields["context_length"].default
    try:
        fields, data_updates = hf_recipe_updates(init, {**model, "context_length": context}, sections, overridden)
    except LlmctlError as e:
        raise LlmctlError(f"{where}: {e.message}", kind=e.kind, exit_code=e.exit_code) from None
    model.update(fields)
    sections.update(data_updates)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, in section order, for run dirs and best.yaml."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
