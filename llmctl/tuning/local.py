"""Run a study on this machine: open it, fail its dead workers' trials, start `--jobs` worker processes
until it has its trials, and write its outputs. The CLI only parses and draws (`StudyProgress`).

Each worker (llmctl/tuning/worker.py) runs trials of the shared study in its own process with its own
GPU or share of the CPU threads, and reports through a pipe why it stopped early (a full disk).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmctl.artifacts import StudyDir, writing
from llmctl.config.schema import Recipe
from llmctl.errors import EXIT_FAILURE, LlmctlError


class StudyProgress:
    """What `run_study` tells the person running it; every method is optional."""

    def on_message(self, text: str) -> None: ...

    def on_workers(self, study: Any, trials: int) -> None:
        """The workers started; `on_poll` follows about once a second until they end."""

    def on_poll(self) -> None: ...

    def on_end(self) -> None: ...


@dataclass
class StudyOutcome:
    summary: dict[str, Any]
    interrupted: bool = False  # Ctrl-C: the same command continues it
    stops: list[dict[str, Any]] = field(default_factory=list)  # why workers stopped early: {"message", "kind"}

    def raise_for_stop(self) -> None:
        """A worker stopped by the machine (a full disk) ends the command with its one line, exit 1."""
        if self.stops:
            first = self.stops[0]
            raise LlmctlError(first["message"], kind=first.get("kind", "worker"), exit_code=EXIT_FAILURE)


def run_study(recipe_path: Path, overrides: list[str], recipe: Recipe, study_dir: Path, storage: str | None,
              jobs: int, progress: StudyProgress, prepare: Callable[[Recipe], Any]) -> StudyOutcome:
    """Run the study of `recipe` (loaded from `recipe_path` with `overrides`) until it has `tune.trials`;
    `prepare(recipe)` builds (or keeps) its dataset dir first, as `llmctl prepare` would."""
    from llmctl.tuning.study import check_space, open_storage, storage_url

    if not recipe.tune.space:
        raise LlmctlError(f"{recipe_path}: tune.space is empty; name the keys to search, e.g. train.lr: "
                          "{type: float, low: 1e-4, high: 1e-2, log: true}.")
    check_space(recipe_path, overrides, recipe)
    sdir = StudyDir(study_dir)
    sdir.path.mkdir(parents=True, exist_ok=True)
    url = storage_url(sdir, storage)
    opened = open_storage(url, recipe.tune)
    with writing("the study storage", sdir.path, kept="The trials finished so far are kept in the study."):
        outcome = _run(recipe_path, overrides, recipe, sdir, url, opened, jobs, progress, prepare)
    outcome.summary.update(study_dir=str(sdir.path), storage=url)
    return outcome


def _run(recipe_path: Path, overrides: list[str], recipe: Recipe, sdir: StudyDir, url: str, storage: Any, jobs: int,
         progress: StudyProgress, prepare: Callable[[Recipe], Any]) -> StudyOutcome:
    from llmctl.tuning.study import count_finished, fail_dead_trials, open_study, waiting_retries, write_outputs

    study = open_study(recipe, storage)
    dead = fail_dead_trials(study, storage)
    if dead:
        progress.on_message(f"trial {', '.join(map(str, dead))}: its worker is gone; failed, and queued again with the same values")
    slots = worker_slots(jobs)
    prepare(recipe)
    done, retries, trials = count_finished(study), waiting_retries(study), recipe.tune.trials
    interrupted, stops = False, []
    if done < trials or retries:
        again = f" (+{retries} retried)" if retries else ""
        progress.on_message(f"study {recipe.name}: {done} of {trials} trials done{again}; running {jobs} at once -> {sdir.path}")
        _write_spec(sdir, recipe_path, overrides, recipe, url, slots[0]["threads"])
        interrupted, stops = _run_workers(sdir, slots, study, trials, progress)
    else:
        progress.on_message(f"study {recipe.name}: all {trials} trials are done (raise --trials to run more)")
    summary = write_outputs(study, recipe_path, overrides, recipe, sdir)
    return StudyOutcome(summary, interrupted, stops)


def _write_spec(sdir: StudyDir, recipe_path: Path, overrides: list[str], recipe: Recipe, url: str, threads: int) -> None:
    """What every worker needs to join the study (spec.json in the study dir)."""
    spec = {
        "recipe": str(Path(recipe_path).resolve()),
        "overrides": overrides,
        "storage": url,
        "study_dir": str(sdir.path.resolve()),
        "trials": recipe.tune.trials,
        "deadline": time.time() + recipe.tune.timeout_s if recipe.tune.timeout_s else None,
        "cwd": os.getcwd(),
        "parent_pid": os.getpid(),
        "threads": threads,
    }
    sdir.spec.write_text(json.dumps(spec, indent=2), encoding="utf-8")


def worker_slots(jobs: int) -> list[dict[str, Any]]:
    """Devices per worker: one GPU each (never shared), else a share of the CPU threads."""
    import torch

    from llmctl.training.environment import usable_cpus

    threads = max(1, usable_cpus() // jobs)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if jobs > gpus:
            raise LlmctlError(f"--jobs {jobs} needs {jobs} GPUs (one per trial), but {gpus} are visible.")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        return [{"gpu": ids[i], "threads": threads} for i in range(jobs)]
    return [{"gpu": None, "threads": threads} for _ in range(jobs)]


def _run_workers(sdir: StudyDir, slots: list[dict[str, Any]], study: Any, trials: int,
                 progress: StudyProgress) -> tuple[bool, list[dict[str, Any]]]:
    """Start the workers and poll until they end; whether it was interrupted (Ctrl-C), and the reasons
    workers gave for stopping early."""
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
    progress.on_workers(study, trials)
    try:
        while any(w.poll() is None for w in workers):
            progress.on_poll()
            time.sleep(1.0)
        progress.on_poll()
        return False, _stop_reasons(pipes)
    except KeyboardInterrupt:
        _stop(workers)
        progress.on_message("[yellow]interrupted[/]: run the same command again to continue the study")
        return True, []
    finally:
        progress.on_end()
        for fd in pipes:
            os.close(fd)


def _stop(workers: list[subprocess.Popen]) -> None:
    """Ask each worker to stop (SIGINT), then kill those that do not within 30 s."""
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGINT)
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()


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
