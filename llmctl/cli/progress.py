"""Progress display: rich bars when a person watches stderr, plain periodic lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from llmctl.cli.output import err_console, interactive
from llmctl.training.trainer import TrainCallbacks

_PLAIN_EVERY_S = 10.0


class StageProgress:
    """One bar per named stage, fed by an engine's `on_progress(stage, done, total)`."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}
        self._progress = None
        self._last_plain = 0.0

    def __enter__(self) -> "StageProgress":
        if interactive():
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self._progress = Progress(
                TextColumn("{task.description:>10}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, stage: str, done: int, total: int | None) -> None:
        if self._progress is None:
            now = time.monotonic()
            if now - self._last_plain >= _PLAIN_EVERY_S or (total and done >= total):
                self._last_plain = now
                of = f" of {total / 1e6:.1f}" if total else ""
                err_console.print(f"{stage}: {done / 1e6:.1f}{of} MB")
            return
        if stage not in self._bars:
            self._bars[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._bars[stage], completed=done, total=total)


def plan_table(plan: Any) -> Any:
    """The memory plan as a two-column rich table."""
    from rich.table import Table

    table = Table(title="memory plan (per device)", box=None, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in plan.rows():
        table.add_row(label, value)
    return table


class TrainProgress(TrainCallbacks):
    """Bar with step, loss, lr, tokens/s and ETA; eval rows printed above it."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._last: dict[str, Any] = {}
        self._last_plain = 0.0

    def on_start(self, info: dict[str, Any]) -> None:
        if info["plan"] is not None:
            err_console.print(plan_table(info["plan"]))
        chosen = " (chosen by micro_batch_size: auto)" if info["micro_batch_auto"] else ""
        if info.get("task", "lm") == "lm":
            per_step = f"{info['batch_size'] * info['context_length']:,} tokens/step"
        elif info["task"] == "instruct":
            per_step = (f"{info['batch_size']} conversations/step ({info['train_examples']:,} train, {info['val_examples']:,} "
                        f"val; the loss on their {info['train_response_tokens']:,} response tokens)")
        else:
            per_step = (f"{info['batch_size']} examples/step ({info['train_examples']:,} train, {info['val_examples']:,} val; "
                        f"classes {', '.join(map(str, info['classes']))})")
        err_console.print(
            f"training {info['parameters'] / 1e6:.2f}M parameters on {info['device']} x{info['processes']} "
            f"({info['precision']}, {info['strategy'] if info['processes'] > 1 else 'one process'}), "
            f"{per_step}, micro-batch {info['micro_batch_size']}{chosen} x "
            f"{info['accumulation']} accumulation -> {info['run_dir']}"
        )
        if info["start_step"]:
            err_console.print(f"resuming at step {info['start_step']}")
        self._max = info["max_steps"]
        if interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=err_console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=info["max_steps"], completed=info["start_step"], stats="")

    def _stats(self) -> str:
        r = self._last
        if not r:
            return ""
        return f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s"

    def on_step(self, step: int, row: dict[str, Any] | None) -> None:
        if row is not None:
            self._last = row
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=self._stats())
        elif row is not None:
            now = time.monotonic()
            if now - self._last_plain >= _PLAIN_EVERY_S or step == self._max:
                self._last_plain = now
                err_console.print(f"step {step}/{self._max}  {self._stats()}")

    def on_eval(self, row: dict[str, Any]) -> None:
        if "val_f1" in row:
            best = next((f"best {k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("best_") and k != "best_val_loss"),
                        f"best val loss {row['best_val_loss']:.4f}")
            err_console.print(
                f"step {row['step']}: val loss {row['val_loss']:.4f}  accuracy {row['val_accuracy']:.4f}  "
                f"macro-F1 {row['val_f1']:.4f}  ({best})"
            )
            return
        err_console.print(
            f"step {row['step']}: val loss {row['val_loss']:.4f}  ppl {row['val_ppl']:.2f}  "
            f"(best {row['best_val_loss']:.4f})"
        )

    def on_message(self, text: str) -> None:
        err_console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None
