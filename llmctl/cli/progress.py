"""Progress display: rich bars when a person watches stderr, plain periodic lines otherwise."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from rich.markup import escape

from llmctl.cli.output import err_console, interactive
from llmctl.progress import Progress
from llmctl.training.trainer import TrainCallbacks

_PLAIN_EVERY_S = 10.0  # seconds between plain progress lines when no terminal watches


def plain_every_s() -> float:
    """Seconds between plain progress lines (LLMCTL_PROGRESS_EVERY_S, default 10): CI logs stay short."""
    try:
        return max(0.0, float(os.environ.get("LLMCTL_PROGRESS_EVERY_S", _PLAIN_EVERY_S)))
    except ValueError:
        return _PLAIN_EVERY_S


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def eta_of(done: float, total: float | None, elapsed: float) -> str:
    """Time left at the rate so far ('?' until there is a rate)."""
    if not total or done <= 0 or elapsed <= 0:
        return "?"
    return format_seconds(max(0.0, total - done) * elapsed / done)


def format_amount(done: float, total: float | None, unit: str) -> str:
    """'12/58 tensors (21%)', '3.1/31.0 MB (10%)', or without a total '12 tensors'."""
    if unit == "bytes":
        number, unit = (lambda n: f"{n / 1e6:,.1f}"), "MB"
    else:
        number = (lambda n: f"{n:,.0f}")
    unit = f" {unit}" if unit else ""
    if total:
        return f"{number(done)}/{number(total)}{unit} ({100 * done / total:.0f}%)"
    return f"{number(done)}{unit}" if done else ""


class WorkProgress(Progress):
    """Stages of long work: a rich bar with ETA per stage on a terminal, else one line per stage and a
    plain line with done/total and ETA every `plain_every_s()` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._live = None
        self._task = None
        self._text = ""
        self._unit = ""
        self._stage_t0 = self._t0
        self._last_plain = self._t0
        self._done: float = 0
        self._total: float | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def __enter__(self) -> "WorkProgress":
        self._t0 = self._clock()  # stage lines count from here: where the work begins
        if not interactive():
            threading.Thread(target=self._beat, name="llmctl-progress", daemon=True).start()
            return self
        from rich.progress import BarColumn, Progress as Bars, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._live = Bars(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
        )
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._finish_stage()
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def stage(self, text: str, unit: str = "") -> None:
        self._finish_stage()
        with self._lock:
            now = self._clock()
            self._text, self._unit, self._stage_t0, self._last_plain = text, unit, now, now
            self._done, self._total = 0, None
            if self._live is not None:
                self._task = self._live.add_task(escape(text), total=None, amount="")
            else:
                err_console.print(f"[dim]{now - self._t0:6.1f}s[/] {escape(text)}")

    def update(self, done: float, total: float | None = None) -> None:
        with self._lock:
            self._done, self._total = done, total if total is not None else self._total
            if self._live is not None:
                if self._task is not None:
                    self._live.update(self._task, completed=done, total=self._total, amount=self._amount())
                return
            now = self._clock()
            if now - self._last_plain >= plain_every_s() and now > self._stage_t0:
                self._plain_line(now)

    def _beat(self) -> None:
        """Without a terminal, a stage that counts nothing (one long library call) still says it is running."""
        every = plain_every_s() or _PLAIN_EVERY_S
        while not self._stopped.wait(min(every, 1.0)):
            with self._lock:
                now = self._clock()
                if self._text and now - self._last_plain >= every:
                    self._plain_line(now)

    def _plain_line(self, now: float) -> None:
        """'  12.0s   4/11 steps (36%), eta 6s', or for work that counts nothing '  40.0s   running for 30s'."""
        self._last_plain = now
        if self._done:
            where = f"{self._amount()}, eta {eta_of(self._done, self._total, now - self._stage_t0)}"
        else:
            where = f"running for {format_seconds(now - self._stage_t0)}"
        err_console.print(f"[dim]{now - self._t0:6.1f}s[/]   {where}")

    def note(self, text: str) -> None:
        err_console.print(text)

    def _amount(self) -> str:
        return format_amount(self._done, self._total, self._unit)

    def _finish_stage(self) -> None:
        if self._live is not None and self._task is not None:
            total = self._total or 1
            self._live.update(self._task, completed=total, total=total, amount=self._amount())
            self._live.stop_task(self._task)
        self._task = None


class StageProgress:
    """`prepare`'s `on_progress(stage, done, total)` (bytes of text) drawn by a WorkProgress."""

    _LABELS = {"tokenizer": "tokenizer: reading text", "merges": "tokenizer: computing merges", "encode": "encoding"}

    def __init__(self) -> None:
        self._work = WorkProgress()
        self._current: str | None = None

    def __enter__(self) -> "StageProgress":
        self._work.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._work.__exit__(*exc)

    def update(self, stage: str, done: int, total: int | None) -> None:
        if stage != self._current:
            self._current = stage
            self._work.stage(self._LABELS.get(stage, stage), unit="bytes" if stage != "merges" else "")
        self._work.update(done, total)


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
        err_console.print(
            f"training {info['parameters'] / 1e6:.2f}M parameters on {info['device']} x{info['processes']} "
            f"({info['precision']}, {info['strategy'] if info['processes'] > 1 else 'one process'}), "
            f"{info['per_step']}, micro-batch {info['micro_batch_size']}{chosen} x "
            f"{info['accumulation']} accumulation -> {info['run_dir']}"
        )
        if info["start_step"]:
            err_console.print(f"resuming at step {info['start_step']}")
        self._max = info["max_steps"]
        self._first_step, self._started = info["start_step"], time.monotonic()
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
            if now - self._last_plain >= plain_every_s() or step == self._max:
                self._last_plain = now
                eta = eta_of(step - self._first_step, self._max - self._first_step, now - self._started)
                err_console.print(f"step {step}/{self._max}  {self._stats()}  eta {eta}")

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
