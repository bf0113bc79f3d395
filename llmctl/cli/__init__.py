"""The `llmctl` command line: a thin typer layer over the engines.

Nothing heavy is imported here: each command imports torch, accelerate and its
engine inside its own function, so `llmctl --help` and completion stay instant.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import typer
from typer.core import TyperGroup

from llmctl import __version__
from llmctl.cli import compress as compress_cmd
from llmctl.cli import env as env_cmd
from llmctl.cli import eval as eval_cmd
from llmctl.cli import export as export_cmd
from llmctl.cli import prepare as prepare_cmd
from llmctl.cli import recipes as recipes_cmd
from llmctl.cli import report as report_cmd
from llmctl.cli import serve as serve_cmd
from llmctl.cli import train as train_cmd
from llmctl.cli import tune as tune_cmd
from llmctl.cli.help import LlmctlCommand

FIRST_STEPS = """\
llmctl {version}: take a language model from raw text to a served model.

First steps:
  make demo                            the whole pipeline on a tiny model (in a source checkout)
  llmctl recipes ls                    the shipped recipes, one line each
  llmctl recipes cp tiny-gpt my.yaml   copy one to edit
  llmctl train my.yaml                 prepare its data and train (writes runs/my/)

Then `llmctl eval runs/my/model`; `llmctl --help` lists every command."""


def _asks_for_json(args: Sequence[str]) -> bool:
    """Whether `--json` is on the command line (before a `--` that ends the options)."""
    words = list(args)
    return "--json" in (words[: words.index("--")] if "--" in words else words)


def _json_error(e: Exception) -> None:
    """With --json on the command line, an error that never reached a command's own reporting (bad usage,
    an unexpected exception) still leaves its one `{"error": ...}` object on stdout."""
    from llmctl.cli.output import print_json
    from llmctl.errors import EXIT_BAD_INPUT, LlmctlError

    if isinstance(e, LlmctlError):
        message, kind = e.message, e.kind
    elif hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's (typer's own copy's) exceptions
        message = e.format_message()
        kind = "usage" if e.exit_code == EXIT_BAD_INPUT else "bad_input"
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            message = f"{ctx.command_path}: {message}"
    else:
        message, kind = f"{type(e).__name__}: {e}", "internal"
    print_json({"error": {"message": message, "kind": kind}})


class LlmctlGroup(TyperGroup):
    """A command group whose unknown command names the closest real one, and whose bash completion
    understands `key=value` words. Plain `llmctl` prints what to do first. With `--json` on the command
    line, usage errors and unexpected failures print the `{"error": ...}` object too (DESIGN.md)."""

    _json_args = False  # the root group's make_context records whether --json was given

    def get_params(self, ctx: typer.Context) -> list[Any]:
        from llmctl.cli.help import without_flag_metavars

        return without_flag_metavars(super().get_params(ctx))

    def make_context(self, info_name: Optional[str], args: list[str], parent: Any = None, **extra: Any) -> Any:
        if parent is not None:
            return super().make_context(info_name, args, parent=parent, **extra)
        LlmctlGroup._json_args = _asks_for_json(args)
        with self._json_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        if ctx.parent is not None:
            return super().invoke(ctx)
        with self._json_errors():
            return super().invoke(ctx)

    @staticmethod
    @contextmanager
    def _json_errors() -> Iterator[None]:
        """Print the error object for what escapes a command (then let typer report it as usual: exit 2 for
        bad usage, a traceback and exit 1 for a bug); a command's own exit has printed its object already."""
        try:
            yield
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if LlmctlGroup._json_args:
                _json_error(e)
            raise

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        # Here, before any parameter is converted, the guide costs no more than --help.
        if not args and ctx.parent is None and not ctx.resilient_parsing:
            typer.echo(FIRST_STEPS.format(version=__version__))
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        import difflib

        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None and not ctx.resilient_parsing:
            names = [n for n, cmd in self.commands.items() if not cmd.hidden]
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(names)}"
            ctx.fail(f"no such command {name!r}; {hint}")
        return super().resolve_command(ctx, args)

    def _main_shell_completion(self, ctx_args: Any, prog_name: str, complete_var: str | None = None) -> None:
        # typer registers its completion classes while building the command; replace bash's just before use.
        from llmctl.cli.completion import use_bash_equals_fix

        use_bash_equals_fix()
        super()._main_shell_completion(ctx_args, prog_name, complete_var)


app = typer.Typer(
    name="llmctl",
    cls=LlmctlGroup,
    help="Take a language model through its life: prepare data, train, tune, evaluate, compress, export, serve.\n\n"
    "Start with [bold]llmctl recipes ls[/], copy one with [bold]llmctl recipes cp tiny-gpt my.yaml[/], then "
    "[bold]llmctl train my.yaml[/].",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", envvar="LLMCTL_QUIET",
        help="Print only errors (and --json's object): no progress, tables or notes on stderr.",
    ),
) -> None:
    if quiet:
        import warnings

        from llmctl.cli.output import set_quiet

        set_quiet()
        warnings.simplefilter("ignore")  # a library's warning is not an error
        os.environ["LLMCTL_QUIET"] = "1"  # the processes a command starts (train --nproc workers) are quiet too


app.add_typer(recipes_cmd.app, name="recipes", cls=LlmctlGroup)
app.command("prepare", cls=LlmctlCommand, epilog=prepare_cmd.EPILOG)(prepare_cmd.prepare_cli)
app.command("train", cls=LlmctlCommand, epilog=train_cmd.EPILOG)(train_cmd.train_cli)
app.command("tune", cls=LlmctlCommand, epilog=tune_cmd.EPILOG)(tune_cmd.tune_cli)
app.command("eval", cls=LlmctlCommand, epilog=eval_cmd.EPILOG)(eval_cmd.eval_cli)
app.command("compress", cls=LlmctlCommand, epilog=compress_cmd.EPILOG)(compress_cmd.compress_cli)
app.command("export", cls=LlmctlCommand, epilog=export_cmd.EPILOG)(export_cmd.export_cli)
app.command("report", cls=LlmctlCommand, epilog=report_cmd.EPILOG)(report_cmd.report_cli)
app.command("serve", cls=LlmctlCommand, epilog=serve_cmd.EPILOG)(serve_cmd.serve_cli)
app.command("env", cls=LlmctlCommand, epilog=env_cmd.EPILOG)(env_cmd.env_cli)


def main() -> None:
    app(prog_name="llmctl")
