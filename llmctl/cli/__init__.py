"""The `llmctl` command line: a thin typer layer over the engines.

Nothing heavy is imported here: each command imports torch, accelerate and its
engine inside its own function, so `llmctl --help` and completion stay instant.
"""

from __future__ import annotations

from typing import Optional

import typer

from llmctl import __version__
from llmctl.cli import compress as compress_cmd
from llmctl.cli import env as env_cmd
from llmctl.cli import eval as eval_cmd
from llmctl.cli import export as export_cmd
from llmctl.cli import prepare as prepare_cmd
from llmctl.cli import recipes as recipes_cmd
from llmctl.cli import serve as serve_cmd
from llmctl.cli import train as train_cmd
from llmctl.cli import tune as tune_cmd

app = typer.Typer(
    name="llmctl",
    help="Take a language model through its life: prepare data, train, tune, evaluate, compress, export, serve.\n\n"
    "Start with [bold]llmctl recipes ls[/], copy one with [bold]llmctl recipes cp tiny-gpt my.yaml[/], then "
    "[bold]llmctl train my.yaml[/].",
    rich_markup_mode="rich",
    no_args_is_help=True,
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
) -> None:
    pass


app.add_typer(recipes_cmd.app, name="recipes")
app.command("prepare", epilog=prepare_cmd.EPILOG)(prepare_cmd.prepare_cli)
app.command("train", epilog=train_cmd.EPILOG)(train_cmd.train_cli)
app.command("tune", epilog=tune_cmd.EPILOG)(tune_cmd.tune_cli)
app.command("eval", epilog=eval_cmd.EPILOG)(eval_cmd.eval_cli)
app.command("compress", epilog=compress_cmd.EPILOG)(compress_cmd.compress_cli)
app.command("export", epilog=export_cmd.EPILOG)(export_cmd.export_cli)
app.command("serve", epilog=serve_cmd.EPILOG)(serve_cmd.serve_cli)
app.command("env", epilog=env_cmd.EPILOG)(env_cmd.env_cli)


def main() -> None:
    app(prog_name="llmctl")
