"""The shipped recipes: found in a source checkout (recipes/) or an installed wheel (llmctl/_recipes/).

Kept free of pydantic and yaml so shell completion of recipe names stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from llmctl.errors import LlmctlError

_PACKAGE = Path(__file__).resolve().parents[1]


def recipes_dir() -> Path:
    """The folder of shipped recipes: the wheel's copy, else the source checkout's."""
    for candidate in (_PACKAGE / "_recipes", _PACKAGE.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise LlmctlError("no shipped recipes found: this llmctl install is incomplete; reinstall it.", exit_code=1)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """Path of shipped recipe `name` (with or without .yaml), or a did-you-mean error."""
    import difflib

    stem = name.removesuffix(".yaml")
    path = recipes_dir() / f"{stem}.yaml"
    if path.is_file():
        return path
    names = recipe_names()
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise LlmctlError(f"no shipped recipe named {name!r}{hint} Shipped recipes: {', '.join(names)}.")


def recipe_summary(path: Path) -> str:
    """The recipe's first comment line: its one-line purpose."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def copy_recipe(name: str, dest: Path, *, force: bool = False,
                edit: Callable[[str, Path], str] | None = None) -> Path:
    """Copy shipped recipe `name` to `dest` (a file, or a directory to put NAME.yaml in), atomically;
    `edit(text, written_path)` may change the text first. A full disk or a refused permission is a
    one-line WriteFailed, and an earlier file at `dest` is left as it was."""
    from llmctl.artifacts import write_atomic, writing

    src = recipe_path(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise LlmctlError(f"{dest} already exists; pass --force to replace it.")
    text = src.read_text(encoding="utf-8")
    if edit is not None:
        text = edit(text, dest)
    kept = f"The earlier {dest} is unchanged." if dest.exists() else ""
    with writing(f"the recipe {dest}", dest, kept=kept):
        write_atomic(dest, text)
    return dest
