"""How commands speak: people read stderr (rich), machines read one JSON object on stdout."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from llmctl.errors import LlmctlError

# Rich lays out for 80 columns when output is not a terminal; logs and pipes take wider tables.
_LOG_WIDTH = None if os.environ.get("COLUMNS") else 120
# NO_COLOR (no-color.org): no colour and no other text style either; bars still move on a terminal.
_STYLES = None if os.environ.get("NO_COLOR") else "auto"
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_LOG_WIDTH if not sys.stderr.isatty() else None,
                      color_system=_STYLES)
out_console = Console(highlight=False, width=_LOG_WIDTH if not sys.stdout.isatty() else None, color_system=_STYLES)
if _STYLES is None:
    import typer.rich_utils

    typer.rich_utils.COLOR_SYSTEM = None  # typer's usage-error and --help panels


def interactive() -> bool:
    """Progress bars only when a person watches stderr."""
    return err_console.is_terminal and not os.environ.get("CI") and not err_console.quiet


def set_quiet() -> None:
    """`llmctl --quiet`: nothing on stderr but errors; stdout keeps what a command is asked for (--json)."""
    err_console.quiet = True


def silence_unless_main() -> None:
    """In a multi-process run only rank 0 speaks: the others print nothing at all."""
    from llmctl.training.launch import is_main_process

    if not is_main_process():
        err_console.quiet = True
        out_console.quiet = True
        global _json_enabled
        _json_enabled = False


_json_enabled = True


def print_json(obj: dict[str, Any]) -> None:
    if not _json_enabled:
        return
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def reporting_errors(json_mode: bool = False) -> Iterator[None]:
    """Turn an LlmctlError into a one-paragraph message and its exit status, never a traceback."""
    try:
        yield
    except LlmctlError as e:
        if json_mode:
            print_json({"error": {"message": e.message, "kind": e.kind}})
        say_always(f"[bold red]error:[/] {escape(e.message)}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def say(message: str) -> None:
    err_console.print(message)


def say_always(message: str) -> None:
    """What --quiet keeps on stderr: errors, a failed quality gate, the address a server listens on."""
    if not err_console.quiet:
        err_console.print(message, soft_wrap=True, emoji=False)
        return
    Console(stderr=True, highlight=False, soft_wrap=True, color_system=_STYLES).print(message, emoji=False)


def timed(cell: str, row: dict[str, Any]) -> str:
    """A timing as shown: marked `*` when the row's timing rounds disagreed (see add_disturbed_caption)."""
    return f"{cell} *" if row.get("timing_disturbed") else cell


def add_disturbed_caption(table: Any, rows: list[dict[str, Any]]) -> None:
    """Say under the table which timings to distrust: a row whose slowest timing round was more than
    DISTURBED_SPREAD times its fastest ran while another process took the CPU."""
    from llmctl.evaluation.speed import DISTURBED_SPREAD

    spreads = [r["timing_spread"] for r in rows if r.get("timing_disturbed")]
    if spreads:
        table.caption = (f"* timing disturbed: its rounds differ by up to {max(spreads):.1f}x (over {DISTURBED_SPREAD}x), "
                         "another process took the CPU; compare these timings after a rerun on a quiet machine")
        table.caption_justify = "left"
