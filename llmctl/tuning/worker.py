"""One tuning worker: a process that runs trials of a shared study until the study has enough.

`llmctl tune` starts `--jobs` of these (python -m llmctl.tuning.worker SPEC SLOT), each with its
own devices (CUDA_VISIBLE_DEVICES) or share of CPU threads. Each trial is an ordinary
`train_run()` of the recipe with the trial's overrides, in the trial's own run dir.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError
from llmctl.training.trainer import TrainCallbacks


class TuneParentGone(BaseException):
    """`llmctl tune` is gone (killed): this worker gives its trial back and stops.

    A BaseException, so that Optuna's `catch=(Exception,)` does not record it as the trial's own failure.
    """


class MachineFailure(BaseException):
    """A trial stopped by the machine, not by its values (a full disk, a refused permission): the worker
    gives the trial back to be retried with the same values and stops, reporting `error` to `llmctl tune`."""

    def __init__(self, error: LlmctlError):
        super().__init__(error.message)
        self.error = error


# `llmctl tune` hands each worker the write end of a pipe (its number in this variable) for the one-line
# reason it stopped: a pipe, because the reason may be that the disk is full.
REPORT_FD_ENV = "LLMCTL_TUNE_REPORT_FD"
MACHINE_KINDS = ("disk_full", "not_writable")


def suggest_overrides(trial: Any, space: dict[str, Any]) -> list[str]:
    """Sample every key of the space on `trial`; return them as section.key=value overrides."""
    out = []
    for key, dist in space.items():
        if dist.type == "float":
            value = trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
        elif dist.type == "int":
            value = trial.suggest_int(key, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log)
        else:
            value = trial.suggest_categorical(key, dist.choices)
        out.append(f"{key}={json.dumps(value)}")
    return out


class TrialReporter(TrainCallbacks):
    """Reports the objective at each evaluation; raises TrialPruned when the pruner says so."""

    def __init__(self, trial: Any, objective: str, direction: str, parent_pid: int | None, max_steps: int):
        self.trial = trial
        self.max_steps = max_steps
        self.objective = objective
        self.sign = 1 if direction == "minimize" else -1
        self.parent_pid = parent_pid
        self.best: float | None = None

    def on_step(self, step: int, row: dict[str, Any] | None) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise TuneParentGone()

    def on_eval(self, row: dict[str, Any]) -> None:
        import optuna

        if self.objective not in row:
            have = ", ".join(k for k in row if k not in {"step", "tokens", "elapsed_s"})
            raise LlmctlError(f"tune.objective {self.objective!r} is not reported by evaluation (it reports {have}).")
        value = float(row[self.objective])
        if not math.isfinite(value):
            raise LlmctlError(f"diverged: {self.objective} is {value} at step {row['step']}", kind="nonfinite")
        if self.best is None or self.sign * value < self.sign * self.best:
            self.best = value
        self.trial.report(value, row["step"])
        # Pruning at the last evaluation would save nothing and hide a fully trained trial.
        if row["step"] < self.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {row['step']} ({self.objective} {value:.4g})")


def run_trial(trial: Any, spec: dict[str, Any]) -> float:
    """The objective: train the recipe with this trial's values; its best evaluated objective."""
    from llmctl.artifacts import StudyDir
    from llmctl.config.loader import load_recipe
    from llmctl.training.run import train_run

    base = load_recipe(spec["recipe"], spec["overrides"])
    run_dir = StudyDir(Path(spec["study_dir"])).trial(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    from llmctl.tuning.study import worker_identity

    trial.set_user_attr("worker", {**worker_identity(), "slot": spec.get("slot"), "threads": _threads(),
                                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    # tune.max_steps is each trial's budget: it replaces train.epochs too, which would otherwise win.
    budget = [f"train.max_steps={base.tune.max_steps}", "train.epochs=null"] if base.tune.max_steps else []
    reporter = TrialReporter(
        trial, base.tune.objective, base.tune.direction, spec.get("parent_pid"), base.tune.max_steps or base.train.max_steps
    )
    try:
        overrides = suggest_overrides(trial, base.tune.space)
        recipe = load_recipe(spec["recipe"], [*spec["overrides"], *budget, *overrides])
        if base.tune.nproc_per_trial > 1:
            return _run_launched_trial(trial, spec, base, [*spec["overrides"], *budget, *overrides], run_dir)
        train_run(recipe, run_dir, overwrite=True, callbacks=reporter, prepare=None)  # `tune` prepared the dataset once
    except LlmctlError as e:
        if e.kind in MACHINE_KINDS:
            raise MachineFailure(_for_the_study(e, trial.number)) from None
        trial.set_user_attr("fail_reason", e.message)
        raise
    except Exception as e:
        import optuna

        if not isinstance(e, optuna.TrialPruned):
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:500])
        raise
    if reporter.best is None:
        raise LlmctlError("the trial finished without an evaluation; lower train.eval_every.")
    return reporter.best


def _run_launched_trial(trial: Any, spec: dict[str, Any], base: Any, overrides: list[str], run_dir: Path) -> float:
    """Train the trial with `llmctl train --nproc N`; its rank 0 reports to this trial."""
    import subprocess

    import optuna

    from llmctl.artifacts import RunDir, iter_jsonl
    from llmctl.tuning.distributed import TRIAL_ENV

    context = {
        "recipe": spec["recipe"], "overrides": spec["overrides"], "storage": spec["storage"],
        "trial_id": trial._trial_id, "objective": base.tune.objective,
        "max_steps": base.tune.max_steps or base.train.max_steps,
    }
    cmd = [sys.executable, "-m", "llmctl", "train", spec["recipe"], *overrides, "--run-dir", str(run_dir),
           "--overwrite", "--nproc", str(base.tune.nproc_per_trial), "--json"]
    child = subprocess.Popen(cmd, env={**os.environ, TRIAL_ENV: json.dumps(context)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    while True:
        try:
            out, err = child.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if os.getppid() != spec["parent_pid"]:
                os.killpg(child.pid, 9)
                raise TuneParentGone() from None
    if child.returncode != 0:
        reported = _json_error(out)
        if reported is not None:
            raise LlmctlError(reported["message"], kind=reported.get("kind", "bad_input"), exit_code=child.returncode)
        lines = [line for line in (err or "").splitlines() if line.strip()]
        said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        raise LlmctlError(said[0] if said else f"llmctl train --nproc exited {child.returncode}: {lines[-1] if lines else ''}")
    pruned_at = trial.study._storage.get_trial(trial._trial_id).user_attrs.get("pruned_at_step")
    if pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {pruned_at} by rank 0")
    sign = 1 if base.tune.direction == "minimize" else -1
    values = [float(r[base.tune.objective]) for r in iter_jsonl(RunDir(run_dir).metrics) if base.tune.objective in r]
    if not values:
        raise LlmctlError("the trial finished without an evaluation; lower train.eval_every.")
    return min(values, key=lambda v: sign * v)


def _for_the_study(error: LlmctlError, number: int) -> LlmctlError:
    """A trial's write failure, with what to do said for the study rather than for a lone train run."""
    from llmctl.artifacts import WriteFailed

    again = (f"{error.fix[0].upper()}{error.fix[1:]}, then run the same `llmctl tune` command again: the finished "
             f"trials are kept and trial {number} runs again with the same values.")
    if isinstance(error, WriteFailed):
        return WriteFailed(error.problem, kept="", remedy=again, fix=error.fix, kind=error.kind)
    return error


def _json_error(stdout: str | None) -> dict[str, Any] | None:
    """The `{"error": {...}}` object `llmctl train --json` printed, if it printed one."""
    try:
        obj = json.loads(stdout or "")
    except ValueError:
        return None
    error = obj.get("error") if isinstance(obj, dict) else None
    return error if isinstance(error, dict) and isinstance(error.get("message"), str) else None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def work(spec_path: Path, slot: int) -> int:
    """Run trials until the study has enough; 0 when it has, 1 when this worker had to stop."""
    spec = {**json.loads(Path(spec_path).read_text(encoding="utf-8")), "slot": slot}
    os.chdir(spec["cwd"])
    import torch

    torch.set_num_threads(spec["threads"])
    from llmctl.artifacts import writing
    from llmctl.config.loader import load_recipe
    from llmctl.tuning.study import open_storage

    recipe = load_recipe(spec["recipe"], spec["overrides"])
    storage = open_storage(spec["storage"], recipe.tune)
    try:
        with writing("the study storage", Path(spec["study_dir"])):
            return _run_trials(spec, slot, recipe, storage)
    except LlmctlError as e:  # the storage could not be written: nothing can be given back through it
        _report_stop(e)
        return 1


def _run_trials(spec: dict[str, Any], slot: int, recipe: Any, storage: Any) -> int:
    from llmctl.tuning.study import count_finished, fail_dead_trials, open_study, waiting_retries

    study = open_study(recipe, storage, seed_offset=1000 * slot + len(study_trials(storage, recipe.name)))
    deadline = spec.get("deadline")
    while count_finished(study) < spec["trials"] or waiting_retries(study):
        if deadline is not None and time.time() >= deadline:
            break
        if os.getppid() != spec["parent_pid"]:
            return 1
        fail_dead_trials(study, storage)
        try:
            study.optimize(lambda t: run_trial(t, spec), n_trials=1, catch=(Exception,))
        except TuneParentGone:
            fail_dead_trials(study, storage, only_pid=os.getpid())
            return 1
        except MachineFailure as stop:
            fail_dead_trials(study, storage, only_pid=os.getpid())
            _report_stop(stop.error)
            return 1
    return 0


def _report_stop(error: LlmctlError) -> None:
    """Tell `llmctl tune` why this worker stopped (through its pipe; on stderr when run by hand)."""
    message = json.dumps({"message": error.message, "kind": error.kind}) + "\n"
    fd = os.environ.get(REPORT_FD_ENV)
    if fd is None:
        print(f"error: {error.message}", file=sys.stderr)
        return
    try:
        os.write(int(fd), message.encode("utf-8"))
    except OSError:
        print(f"error: {error.message}", file=sys.stderr)


def study_trials(storage: Any, name: str) -> list[Any]:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


if __name__ == "__main__":
    sys.exit(work(Path(sys.argv[1]), int(sys.argv[2])))
