"""How commands show their help: typer's rich help with one fix, so it reads as the command line works."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


def without_flag_metavars(params: list[Any]) -> list[Any]:
    """Give each flag (`--json`, `--overwrite`, `--help`) an empty metavar: typer's rich help would otherwise show
    `<bool>` beside it, as if it took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class LlmctlCommand(TyperCommand):
    """A subcommand whose help shows no value type beside its flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return without_flag_metavars(super().get_params(ctx))
