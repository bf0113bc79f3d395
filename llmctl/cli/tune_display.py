"""How `llmctl tune` draws a study: the live trials table on a terminal, one line per finished trial
otherwise (both with the study's count and ETA), and the summary at the end."""

from __future__ import annotations

import time
from typing import Any

from llmctl.cli.output import err_console, interactive, out_console, say
from llmctl.tuning.local import StudyProgress


class TrialsDisplay(StudyProgress):
    """The trials table, live on a terminal; one line per finished trial otherwise; both with the ETA of the
    study at the pace of the trials finished in this run."""

    def __init__(self) -> None:
        self.study: Any = None
        self.live: Any = None

    def on_message(self, text: str) -> None:
        say(text)

    def on_workers(self, study: Any, trials: int) -> None:
        from llmctl.tuning.study import count_finished

        self.study, self.trials = study, trials
        self.finished_before = count_finished(study)
        self.started = time.monotonic()
        self.reported: set[int] = set()
        self.shown = 0  # finished trials (those that count towards the total) among the reported
        if interactive():
            from rich.live import Live

            self.live = Live(console=err_console, refresh_per_second=2)
            self.live.__enter__()

    def on_poll(self) -> None:
        from llmctl.tuning.study import trial_rows

        rows = trial_rows(self.study)
        if self.live is not None:
            table = trials_table(rows)
            table.caption = self._where(sum(r["counts"] for r in rows))
            self.live.update(table)
            return
        for r in rows:
            if r["state"] not in ("running", "waiting") and r["number"] not in self.reported:
                self.reported.add(r["number"])
                self.shown += r["counts"]
                err_console.print(f"{trial_line(r)}  [dim]({self._where(self.shown)})[/]")

    def _where(self, finished: int) -> str:
        """'4/10 trials, eta 1m20s': the ETA at the pace of the trials finished since this run began."""
        from llmctl.cli.progress import eta_of

        done = finished - self.finished_before
        eta = eta_of(done, self.trials - self.finished_before, time.monotonic() - self.started)
        return f"{finished}/{self.trials} trials, eta {eta}"

    def on_end(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_line(r: dict[str, Any]) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
    value = "" if r["value"] is None else f" {_fmt(r['value'])}"
    step = f" at step {r['last_reported_step']}" if r["state"] == "pruned" else ""
    reason = f" ({r['reason']})" if r["reason"] else ""
    return f"trial {r['number']}: {r['state']}{value}{step}  {params}{reason}"


def trials_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table("trial", "state", "objective", "params", "duration", box=None, header_style="bold")
    for r in rows:
        params = "  ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        duration = f"{r['duration_s']:.0f} s" if r["duration_s"] is not None else ""
        value = _fmt(r["value"]) if r["value"] is not None else (r["reason"][:40] or "")
        table.add_row(str(r["number"]), r["state"], value, params, duration)
    return table


def print_summary(summary: dict[str, Any], to_stdout: bool) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n)
    say(f"trials: {counts}")
    best = summary.get("best")
    if best:
        params = "  ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        (out_console if to_stdout else err_console).print(
            f"best trial {best['number']}: {summary['objective']} {_fmt(best['value'])}  {params}", soft_wrap=True
        )
        say(f"best recipe: {summary['best_recipe']}  (train it: llmctl train {summary['best_recipe']})")
        say(f"table: {summary['trials_csv']}  plots: {', '.join(summary['plots'])}")
    else:
        say("no trial completed yet")
