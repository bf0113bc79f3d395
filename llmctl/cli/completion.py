"""Shell-completion candidates that know llmctl's domain; cheap to compute, importing nothing heavy.

Recipe files and shipped recipe names, dotted recipe keys and their values (read from the schema, so they
never drift from it), and the model and export dirs that `eval`, `compress`, `export` and `serve` take.
The schema (pydantic) is imported only when a recipe key is being completed.
"""

from __future__ import annotations

import functools
import re
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union, get_args, get_origin

import typer
from typer._completion_classes import BashComplete, add_completion_class, click_split_arg_string

# --- files and dirs ----------------------------------------------------------------------------------


def complete_recipe_name(incomplete: str) -> list[str]:
    """Names of the shipped recipes (`llmctl recipes ls`) starting with `incomplete`."""
    from llmctl.config.catalog import recipe_names

    try:
        return [n for n in recipe_names() if n.startswith(incomplete)]
    except Exception:
        return []


def _entries(incomplete: str) -> Iterator[tuple[str, Path]]:
    """(text to offer, path) of each entry of the typed folder whose name continues the typed prefix.

    Hidden entries only when the prefix itself starts with a dot; the text keeps the folder as typed (`~/`, `./`).
    """
    cut = incomplete.rfind("/") + 1
    shown, prefix = incomplete[:cut], incomplete[cut:]
    try:
        entries = sorted(Path(shown or ".").expanduser().iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(prefix) and (prefix.startswith(".") or not entry.name.startswith(".")):
            yield f"{shown}{entry.name}", entry


def _subdirs(folder: str) -> list[Path]:
    try:
        return sorted(p for p in Path(folder).iterdir() if p.is_dir())
    except OSError:
        return []


def complete_recipe_file(incomplete: str) -> list[str]:
    """YAML files and directories under the typed prefix (recipe paths)."""
    out = []
    for text, entry in _entries(incomplete):
        if entry.is_dir():
            out.append(f"{text}/")
        elif entry.suffix in {".yaml", ".yml"}:
            out.append(text)
    return out


def _artifact_kind(path: Path) -> str | None:
    """"export" for an export dir, "model" for a model dir, else None; two stats, no parsing."""
    from llmctl.artifacts import ExportDir, ModelDir

    if ExportDir(path).is_export():
        return "export"
    if ModelDir(path).config.is_file():
        return "model"
    return None


def _artifact_dirs(incomplete: str, kinds: set[str]) -> list[str]:
    """The usual homes of artifacts first (runs/*/model, out/*), then the typed folder's own entries:
    an artifact dir of an accepted kind as is, a plain dir with a trailing / to descend into."""
    from llmctl.artifacts import RunDir

    known = [RunDir(run).model.path for run in _subdirs("runs")] + _subdirs("out")
    hits = [str(p) for p in known if str(p).startswith(incomplete) and _artifact_kind(p) in kinds]
    for text, entry in _entries(incomplete):
        if not entry.is_dir() or text in hits:
            continue
        kind = _artifact_kind(entry)
        if kind is None:
            hits.append(f"{text}/")
        elif kind in kinds:
            hits.append(text)
    return hits


def complete_model_dir(incomplete: str) -> list[str]:
    """Model dirs (runs/<name>/model, compressed ones in out/), then dirs to descend into."""
    return _artifact_dirs(incomplete, {"model"})


def complete_model_or_export_dir(incomplete: str) -> list[str]:
    """Model dirs and export dirs (runs/<name>/model, out/*), then dirs to descend into."""
    return _artifact_dirs(incomplete, {"model", "export"})


def choices(*values: str) -> Callable[[str], list[str]]:
    """Completion for an option with a closed set of values, which llmctl itself validates (so its error
    message, not a generic one, names what is allowed)."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return complete


# --- recipe keys and values ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def recipe_keys() -> dict[str, tuple[Any, str, Any]]:
    """Every dotted key the command line can set (`train.lr`, `train.lora.rank`) -> (type, one-line help, default).

    Walked from the schema's pydantic models, so a new setting completes without any table to update.
    """
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from llmctl.config.schema import Recipe
    from llmctl.config.tagged import TaggedSection

    keys: dict[str, tuple[Any, str, Any]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            section = next((t for t in _flatten(field.annotation) if _is_model(t, (BaseModel, TaggedSection))), None)
            if section is not None:
                walk(section, f"{prefix}{name}.")
                continue
            default = None if field.default is PydanticUndefined else field.default
            keys[f"{prefix}{name}"] = (field.annotation, _short_help(field.description or ""), default)

    walk(Recipe, "")
    return keys


def _is_model(annotation: Any, base: type | tuple[type, ...]) -> bool:
    return isinstance(annotation, type) and get_origin(annotation) is None and issubclass(annotation, base)


def _flatten(annotation: Any) -> list[Any]:
    """The alternatives of a type: int | Literal["auto"] | None -> [int, "auto" literal type, NoneType]."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _flatten(arg)]
    return [annotation]


def _short_help(text: str, width: int = 60) -> str:
    """The description's first sentence, cut to `width` characters: typer's renderer wraps longer help onto
    a second line, which fish would read as another candidate."""
    first = re.split(r"(?<=\.)\s+(?=[A-Z(])", " ".join(text.split()), maxsplit=1)[0]
    return first if len(first) <= width else first[: width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def value_choices(annotation: Any) -> tuple[list[str], bool]:
    """The values a key takes as they are typed (enum members, true/false, null) and whether it takes others too."""
    choices: list[str] = []
    free = False
    nullable = False
    for alt in _flatten(annotation):
        if get_origin(alt) is Literal:
            choices += [str(v) for v in get_args(alt)]
        elif alt is bool:
            choices += ["true", "false"]
        elif alt is type(None):
            nullable = True
        else:
            free = True
    # null is worth offering beside a closed set of choices; for a free value it would only hide file completion.
    if nullable and choices:
        choices.append("null")
    return choices, free


def _current_value(recipe: Path | None, key: str) -> Any:
    """The key's value in the recipe file, else the schema's default; None when neither says."""
    import yaml

    try:
        if recipe is not None and recipe.is_file() and recipe.stat().st_size < 1_000_000:
            node: Any = yaml.safe_load(recipe.read_text(encoding="utf-8"))
            for part in key.split("."):
                node = node[part]
            return node
    except Exception:  # a half-written recipe, or the key not set in it
        pass
    return recipe_keys()[key][2]


def _as_typed(value: Any) -> str | None:
    """A scalar as it would be typed after key=, or None for what a shell word cannot carry plainly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value and re.fullmatch(r"[\w.:/+@%-]+", value):
        return value
    return None


def override_candidates(incomplete: str, recipe: Path | None = None) -> list[tuple[str, str]]:
    """(candidate, help) for a `section.key=value` override being typed.

    Before the `=`: the dotted keys starting with `incomplete`, each with its `=` (the value comes next: bash then
    adds no space). After it: an enum's members, true/false for a boolean, else the key's current value (recipe
    file, then schema default), or nothing for an unset path.
    """
    try:
        keys = recipe_keys()
    except Exception:  # a broken install should cost completion, never the shell prompt
        return []
    key, sep, typed = incomplete.partition("=")
    if not sep:
        return [(f"{k}=", help) for k, (_, help, _) in keys.items() if k.startswith(incomplete)]
    if key not in keys:
        return []
    choices, free = value_choices(keys[key][0])
    current = _as_typed(_current_value(recipe, key)) if free or not choices else None
    if current is not None and current not in choices:
        choices.append(current)
    return [(f"{key}={v}", "") for v in choices if v.startswith(typed)]


def complete_override(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """typer autocompletion for `section.key=value` overrides, reading the recipe given before them."""
    recipe = ctx.params.get("recipe")
    return override_candidates(incomplete, Path(recipe) if recipe else None)


# --- bash: the `=` in key=value, and no space after a dir or a key ------------------------------------------

# typer's bash script with one addition. Its candidate protocol is one plain word a line, with nothing to say
# "this word goes on", and bash ends a lone candidate with a space: `recipes/ `, `model.family= `. A candidate
# ending in / (a dir to descend into) or = (a key whose value comes next) is such a word, so when it is the only
# one the script turns the space off for this completion (`compopt -o nospace`).
BASH_SCRIPT = """
%(complete_func)s() {
    local IFS=$'\\n'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \\
                   COMP_CWORD=$COMP_CWORD \\
                   %(autocomplete_var)s=complete_bash $1 ) )
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *[/=] ]]; then
        compopt -o nospace
    fi
    return 0
}

complete -o default -F %(complete_func)s %(prog_name)s
"""


class _BashComplete(BashComplete):
    """Bash splits `train.lr=3` into `train.lr`, `=`, `3` (COMP_WORDBREAKS) and replaces only the text after the `=`.

    Join such words again, so an override completes as one word, and print each candidate from where bash's
    word starts: `model.family=<TAB>` offers `gpt rnn lstm gru`. The script is BASH_SCRIPT.
    """

    source_template = BASH_SCRIPT

    _cut = ""  # the part of the completed word that bash keeps, left of its last `=`

    def get_completion_args(self) -> tuple[list[str], str]:
        import os

        words = click_split_arg_string(os.environ["COMP_WORDS"])
        cword = int(os.environ["COMP_CWORD"])
        joined: list[str] = []
        for before, word in zip(words[:cword], words[1 : cword + 1]):
            if joined and (word == "=" or before == "="):
                joined[-1] += word
            else:
                joined.append(word)
        if cword >= len(words) or not joined:  # the cursor starts a new word
            return joined, ""
        incomplete = joined[-1]
        self._cut = incomplete[: incomplete.rfind("=") + 1]
        return joined[:-1], incomplete

    def format_completion(self, item: Any) -> str:
        # An option's value (--recipe=my<TAB>) comes back without the `--recipe=`: nothing to cut then.
        value = item.value
        return value[len(self._cut) :] if self._cut and value.startswith(self._cut) else value


def use_bash_equals_fix() -> None:
    """Make `complete_bash` and `source_bash` requests go through _BashComplete, and `--show-completion` /
    `--install-completion` write BASH_SCRIPT; call after typer registered its own classes."""
    from typer import _completion_shared

    add_completion_class(_BashComplete, "bash")
    _completion_shared._completion_scripts["bash"] = BASH_SCRIPT
