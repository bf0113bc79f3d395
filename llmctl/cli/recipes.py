"""`llmctl recipes ls | show | cp | validate | schema`: find, read, fork and check recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_recipe_file, complete_recipe_name
from llmctl.cli.help import LlmctlCommand
from llmctl.cli.output import out_console, print_json, reporting_errors, say

app = typer.Typer(
    help="List, show, copy and validate recipes (one YAML file per model: data, model, train).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@app.command("ls", cls=LlmctlCommand, epilog="Example: llmctl recipes ls")
def ls_cli() -> None:
    """List the shipped recipes with their one-line purpose."""
    from rich.table import Table

    from llmctl.config.catalog import recipe_names, recipe_path, recipe_summary

    with reporting_errors():
        table = Table("recipe", "purpose", box=None, header_style="bold")
        for name in recipe_names():
            table.add_row(name, recipe_summary(recipe_path(name)))
        out_console.print(table)


@app.command("show", cls=LlmctlCommand, epilog="Example: llmctl recipes show tiny-gpt")
def show_cli(
    name: str = typer.Argument(..., help="A shipped recipe's name.", autocompletion=complete_recipe_name),
) -> None:
    """Print a shipped recipe."""
    from llmctl.config.catalog import recipe_path

    with reporting_errors():
        typer.echo(recipe_path(name).read_text(encoding="utf-8"), nl=False)


@app.command("cp", cls=LlmctlCommand, epilog="Example: llmctl recipes cp tiny-gpt my.yaml")
def cp_cli(
    name: str = typer.Argument(..., help="A shipped recipe's name.", autocompletion=complete_recipe_name),
    dest: Path = typer.Argument(..., help="Where to write it: a file, or a directory."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace DEST if it exists."),
) -> None:
    """Copy a shipped recipe to a file you can edit; its run name becomes the file's stem (and its comments say so)."""
    from llmctl.config.catalog import copy_recipe

    with reporting_errors():
        written = copy_recipe(name, dest, force=force,
                              edit=lambda text, path: renamed_in_comments(text, name.removesuffix(".yaml"), path.stem))
        say(f"wrote {written}")


def renamed_in_comments(text: str, old: str, new: str) -> str:
    """A recipe's text with its name `old` changed to `new` in the comments, where it names the file or its outputs
    (`llmctl train tiny-gpt.yaml`, `runs/tiny-gpt/model`, `out/tiny-gpt-int8`); the values stay as they are."""
    import re

    if old == new:
        return text
    name = re.compile(rf"(?<![\w-])(?:recipes/)?{re.escape(old)}(?P<yaml>\.yaml)?(?!\w)")
    comment = re.compile(r"(^|\s)#")  # YAML: a comment starts at a # that begins the line or follows a space

    def rename(match: re.Match[str]) -> str:
        return f"{new}.yaml" if match.group("yaml") else new

    lines = []
    for line in text.splitlines(keepends=True):
        start = comment.search(line)
        lines.append(line if start is None else line[: start.end()] + name.sub(rename, line[start.end():]))
    return "".join(lines)


@app.command("validate", cls=LlmctlCommand, epilog="Example: llmctl recipes validate my.yaml train.lr=3e-4 --json")
def validate_cli(
    recipe: Path = typer.Argument(..., help="Recipe file.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides.", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (the resolved recipe) on stdout."),
) -> None:
    """Check a recipe (with overrides) without running anything; print it fully resolved."""
    from llmctl.config import load_recipe, recipe_to_yaml

    with reporting_errors(json_out):
        resolved = load_recipe(recipe, overrides or [])
        if json_out:
            print_json({"valid": True, "path": str(recipe), "recipe": resolved.model_dump(mode="json")})
        else:
            typer.echo(recipe_to_yaml(resolved), nl=False)
            say(f"{recipe}: valid")


@app.command("schema", cls=LlmctlCommand, epilog="Example: llmctl recipes schema > recipe.schema.json")
def schema_cli() -> None:
    """Print the recipe JSON Schema (types, defaults, bounds, descriptions), e.g. for editor completion."""
    import json

    from llmctl.config.schema import Recipe

    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))
