"""`llmctl tune`: hyperparameter search over the recipe's `tune.space` with Optuna."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from llmctl.cli.completion import complete_override, complete_recipe_file
from llmctl.cli.output import err_console, interactive, out_console, print_json, reporting_errors, say

EPILOG = "Example: llmctl tune recipes/tiny-gpt-tune.yaml --trials 20 --jobs 2, then llmctl train runs/tiny-gpt-tune/best.yaml"


def tune_cli(
    recipe: Path = typer.Argument(..., help="Recipe file with a tune section.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="section.key=value overrides.", show_default=False, autocompletion=complete_override
    ),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="The study's total trials (a rerun continues to it)."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Trials at once, each in its own process with its own GPU or CPU threads."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (e.g. postgresql://...); default a SQLite file in the study dir."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="Start no trial after this many seconds."),
    study_dir: Optional[Path] = typer.Option(None, "--study-dir", help="Study dir (default runs/<run.name>)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Search the recipe's tune.space: trials are ordinary train runs, pruned early, resumable."""
    with reporting_errors(json_out):
        from llmctl.artifacts import StudyDir
        from llmctl.config import load_recipe
        from llmctl.errors import LlmctlError

        extra = [*(overrides or [])]
        if trials is not None:
            extra.append(f"tune.trials={trials}")
        if timeout is not None:
            extra.append(f"tune.timeout_s={timeout}")
        resolved = load_recipe(recipe, extra)
        if not resolved.tune.space:
            raise LlmctlError(f"{recipe}: tune.space is empty; name the keys to search, e.g. train.lr: {{type: float, low: 1e-4, high: 1e-2, log: true}}.")
        sdir = StudyDir(study_dir or Path("runs") / resolved.name)
        sdir.path.mkdir(parents=True, exist_ok=True)
        from llmctl.artifacts import writing
        from llmctl.tuning.study import check_space, open_storage, storage_url

        check_space(recipe, extra, resolved)

        url = storage_url(sdir, storage)
        storage = open_storage(url, resolved.tune)
        with writing("the study storage", sdir.path, kept="The trials finished so far are kept in the study."):
            _run_study(recipe, extra, resolved, sdir, url, storage, jobs, json_out)


def _run_study(recipe: Path, extra: list[str], resolved: Any, sdir: Any, url: str, storage: Any, jobs: int,
               json_out: bool) -> None:
    """Fail dead workers' trials, run the workers until the study has its trials, write and print its outputs."""
    from llmctl.errors import EXIT_FAILURE, LlmctlError
    from llmctl.tuning.study import count_finished, fail_dead_trials, open_study, waiting_retries, write_outputs

    study = open_study(resolved, storage)
    dead = fail_dead_trials(study, storage)
    if dead:
        say(f"trial {', '.join(map(str, dead))}: its worker is gone; failed, and queued again with the same values")
    slots = _slots(jobs)

    from llmctl.cli.prepare import run_prepare

    run_prepare(resolved)
    done = count_finished(study)
    retries = waiting_retries(study)
    if done < resolved.tune.trials or retries:
        again = f" (+{retries} retried)" if retries else ""
        say(f"study {resolved.name}: {done} of {resolved.tune.trials} trials done{again}; running {jobs} at once -> {sdir.path}")
        spec = {
            "recipe": str(recipe.resolve()),
            "overrides": extra,
            "storage": url,
            "study_dir": str(sdir.path.resolve()),
            "trials": resolved.tune.trials,
            "deadline": time.time() + resolved.tune.timeout_s if resolved.tune.timeout_s else None,
            "cwd": os.getcwd(),
            "parent_pid": os.getpid(),
            "threads": slots[0]["threads"],
        }
        sdir.spec.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        interrupted, stops = _run_workers(sdir, slots, study, resolved.tune.trials)
    else:
        interrupted, stops = False, []
        say(f"study {resolved.name}: all {resolved.tune.trials} trials are done (raise --trials to run more)")
    summary = write_outputs(study, recipe, extra, resolved, sdir)
    summary["study_dir"] = str(sdir.path)
    summary["storage"] = url
    _print_summary(summary, to_stdout=not json_out)
    if stops:
        first = stops[0]
        raise LlmctlError(first["message"], kind=first.get("kind", "worker"), exit_code=EXIT_FAILURE)
    if json_out:
        print_json(summary)
    if interrupted:
        raise typer.Exit(130)


def _slots(jobs: int) -> list[dict[str, Any]]:
    """Devices per worker: one GPU each (never shared), else a share of the CPU threads."""
    import torch

    from llmctl.errors import LlmctlError
    from llmctl.training.environment import usable_cpus

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if jobs > gpus:
            raise LlmctlError(f"--jobs {jobs} needs {jobs} GPUs (one per trial), but {gpus} are visible.")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        return [{"gpu": ids[i], "threads": max(1, usable_cpus() // jobs)} for i in range(jobs)]
    return [{"gpu": None, "threads": max(1, usable_cpus() // jobs)} for _ in range(jobs)]


def _run_workers(sdir, slots: list[dict[str, Any]], study: Any, trials: int) -> tuple[bool, list[dict[str, Any]]]:
    """Start the workers, draw the live table until they end; whether it was interrupted (Ctrl-C), and the
    reasons workers gave for stopping early (a full disk: `{"message", "kind"}` each)."""
    from llmctl.tuning.worker import REPORT_FD_ENV

    workers, pipes = [], []
    for slot, assign in enumerate(slots):
        read_end, write_end = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": str(assign["threads"]), REPORT_FD_ENV: str(write_end)}
        if assign["gpu"] is not None:
            env["CUDA_VISIBLE_DEVICES"] = assign["gpu"]
        workers.append(subprocess.Popen([sys.executable, "-m", "llmctl.tuning.worker", str(sdir.spec), str(slot)],
                                        env=env, pass_fds=(write_end,)))
        os.close(write_end)
        pipes.append(read_end)
    table = _LiveTrials(study, trials)
    try:
        while any(w.poll() is None for w in workers):
            table.refresh()
            time.sleep(1.0)
        table.refresh()
        return False, _stop_reasons(pipes)
    except KeyboardInterrupt:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGINT)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        say("[yellow]interrupted[/]: run the same command again to continue the study")
        return True, []
    finally:
        table.close()
        for fd in pipes:
            os.close(fd)


def _stop_reasons(pipes: list[int]) -> list[dict[str, Any]]:
    """What each finished worker wrote to its report pipe: one JSON line if it stopped early, else nothing."""
    reasons = []
    for fd in pipes:
        with os.fdopen(os.dup(fd), "rb") as pipe:
            for line in pipe.read().decode("utf-8", errors="replace").splitlines():
                try:
                    reasons.append(json.loads(line))
                except ValueError:
                    continue
    return reasons


class _LiveTrials:
    """The trials table, live on a terminal; one line per finished trial otherwise; both with the ETA of the
    study at the pace of the trials finished in this run."""

    def __init__(self, study: Any, trials: int):
        from llmctl.tuning.study import count_finished

        self.study = study
        self.trials = trials
        self.finished_before = count_finished(study)
        self.started = time.monotonic()
        self.reported: set[int] = set()
        self.shown = 0  # finished trials (those that count towards the total) among the reported
        self.live = None
        if interactive():
            from rich.live import Live

            self.live = Live(console=err_console, refresh_per_second=2)
            self.live.__enter__()

    def refresh(self) -> None:
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
                err_console.print(f"{_trial_line(r)}  [dim]({self._where(self.shown)})[/]")

    def _where(self, finished: int) -> str:
        """'4/10 trials, eta 1m20s': the ETA at the pace of the trials finished since this run began."""
        from llmctl.cli.progress import eta_of

        done = finished - self.finished_before
        eta = eta_of(done, self.trials - self.finished_before, time.monotonic() - self.started)
        return f"{finished}/{self.trials} trials, eta {eta}"

    def close(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_line(r: dict[str, Any]) -> str:
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


def _print_summary(summary: dict[str, Any], to_stdout: bool) -> None:
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
