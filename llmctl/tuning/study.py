"""Open the Optuna study a recipe's `tune` section describes, count its trials, and report it.

Storage: a SQLite file in the study dir by default, opened with Optuna's heartbeat, so a
trial whose worker died (kill -9, a lost machine) is failed and retried
(RetryHeartbeatStaleTrialCallback); a running trial of a live worker keeps beating and is never
touched. Optuna 5's journal file storage would avoid SQLite's locking but has no heartbeat, so it
cannot tell a dead worker from a slow one; SQLite's lock waits (timeout below) are short next to
trials of seconds or more.

Creating the storage is not safe against itself: every `RDBStorage` that opens a database stamps
alembic's version table when it finds none, so two processes opening a new file at once can both
try `CREATE TABLE alembic_version` and one fails. The SQLite file is therefore made once, under a
file lock, under a temporary name and renamed into place whole; a PostgreSQL database is
initialised under an advisory lock.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

from llmctl.artifacts import StudyDir, write_atomic
from llmctl.config.schema import Recipe, TuneConfig
from llmctl.errors import LlmctlError


def quiet_optuna() -> None:
    """Trials' failures are reported by llmctl with their reason; Optuna's own tracebacks and
    experimental-API warnings would only bury them."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def check_space(recipe_path: Path, overrides: list[str], recipe: Recipe) -> None:
    """Refuse a space whose values the recipe schema would reject (lr above its bound, ...) before any trial."""
    from llmctl.config.loader import load_recipe

    for key, dist in recipe.tune.space.items():
        values = dist.choices if dist.type == "categorical" else [dist.low, dist.high]
        for value in values:
            if dist.type == "int":
                value = int(value)
            try:
                load_recipe(recipe_path, [*overrides, f"{key}={json.dumps(value)}"])
            except LlmctlError as e:
                problem = e.message.split(": ", 1)[-1] if e.message.startswith("command line") else e.message
                raise LlmctlError(f"{recipe_path}: tune.space.{key}: the value {value!r} is not a valid {key}: {problem}") from None


def storage_url(study_dir: StudyDir, given: str | None) -> str:
    return given or f"sqlite:///{study_dir.storage_file.resolve()}"


def open_storage(url: str, tune: TuneConfig) -> Any:
    """An Optuna storage with heartbeat and retry of dead workers' trials, created once whatever
    opens it at the same moment; exit 2 if it cannot be opened."""
    quiet_optuna()
    try:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            return _open_sqlite(Path(url.removeprefix("sqlite:///")), tune)
        if url.startswith(("postgresql:", "postgresql+")):
            return _open_under_advisory_lock(url, tune)
        return _rdb_storage(url, tune)
    except LlmctlError:
        raise
    except ModuleNotFoundError as e:  # SQLAlchemy imports the URL's driver (postgresql:// means psycopg 3)
        raise LlmctlError(f"--storage {url}: its database driver {e.name!r} is not installed (pip install "
                          f"{e.name}; for psycopg2 write postgresql+psycopg2://...).") from None
    except Exception as e:  # sqlalchemy raises many kinds; the URL is what is wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"--storage {url}: cannot be opened ({first[:300]}).") from None


def _rdb_storage(url: str, tune: TuneConfig) -> Any:
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=tune.heartbeat_s,
        grace_period=3 * tune.heartbeat_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=tune.retries),
    )


def _open_sqlite(path: Path, tune: TuneConfig) -> Any:
    """Open the SQLite study file, creating it first if this is the first process to get the lock.

    The file is made under `.study.db.<pid>.tmp` and renamed into place once its tables and version
    stamp are written, so no process (nor a tool watching the study dir) ever opens a half-made one.
    """
    from filelock import FileLock

    if not path.parent.is_dir():  # FileLock would create the missing directories
        raise LlmctlError(f"--storage sqlite:///{path}: cannot be opened (no directory {path.parent}).")
    with FileLock(f"{path}.lock", timeout=300):
        if not path.is_file():
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a creator that died (we hold the lock)
                stale.unlink(missing_ok=True)
            staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            _rdb_storage(f"sqlite:///{staged}", tune).engine.dispose()
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, path)
        return _rdb_storage(f"sqlite:///{path}", tune)


# Any fixed 64-bit key: llmctl's processes only need to agree with each other on it.
_ADVISORY_LOCK_KEY = 0x6C6C6D63746C  # "llmctl"


def _open_under_advisory_lock(url: str, tune: TuneConfig) -> Any:
    """Open a PostgreSQL storage while holding a session advisory lock, so that workers starting on
    several hosts at once create Optuna's tables and version stamp once."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
            try:
                return _rdb_storage(url, tune)
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    finally:
        engine.dispose()


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, pid and the process's start time, enough to tell later whether it is gone."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _worker_gone(worker: dict[str, Any]) -> bool:
    """True only for a worker of this host whose process no longer exists (or whose pid was reused)."""
    if worker.get("host") != socket.gethostname() or not isinstance(worker.get("pid"), int):
        return False
    pid = worker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = worker.get("started")
    return started is not None and _process_start(pid) not in (None, started)


def fail_dead_trials(study: Any, storage: Any, only_pid: int | None = None) -> list[int]:
    """Fail the running trials whose worker is gone and queue their retries; the failed trials' numbers.

    Dead means: a heartbeat older than the grace period (Optuna's own check, for workers on any
    host), or a worker on this host whose process has ended — known at once, without waiting out
    the grace period. `only_pid` gives up the trials of that process instead (a worker leaving
    because `llmctl tune` is gone). The retry is Optuna's RetryHeartbeatStaleTrialCallback, so a
    retried trial records the one it replaces.
    """
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    if only_pid is None:
        fail_stale_trials(study)
    failed_ids = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        mine = only_pid is not None and worker.get("pid") == only_pid and worker.get("host") == socket.gethostname()
        if not (mine or (only_pid is None and _worker_gone(worker))):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed_ids.append(t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process finished or failed it first
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed_ids:
        if retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial_id)))
    after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return sorted(t.number for t in after if t.number not in before and "fail_reason" not in t.user_attrs)


def waiting_retries(study: Any) -> int:
    """Retries of dead trials queued and not yet started: work the study still owes."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if "failed_trial" in t.system_attrs)


def make_sampler(tune: TuneConfig, seed: int) -> Any:
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "grid":
        grid = {}
        for key, dist in tune.space.items():
            if dist.type != "categorical":
                raise LlmctlError(f"tune.sampler: grid needs categorical choices for every key; {key} is a {dist.type}.")
            grid[key] = dist.choices
        return optuna.samplers.GridSampler(grid, seed=seed)
    if tune.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=tune.startup_trials, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)


def make_pruner(tune: TuneConfig, max_steps: int, eval_every: int) -> Any:
    import optuna

    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every, max_resource=max_steps)
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every)
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_steps
    )


def open_study(recipe: Recipe, storage: Any, seed_offset: int = 0) -> Any:
    """Create the study or load it to continue; `seed_offset` keeps workers and resumed runs
    from drawing the same random start-up values again."""
    import optuna

    tune = recipe.tune
    max_steps = tune.max_steps or recipe.train.max_steps
    seed = (tune.seed if tune.seed is not None else recipe.run.seed) + seed_offset
    return optuna.create_study(
        study_name=recipe.name,
        storage=storage,
        direction=tune.direction,
        sampler=make_sampler(tune, seed),
        pruner=make_pruner(tune, max_steps, recipe.train.eval_every),
        load_if_exists=True,
    )


def finished(trial: Any) -> bool:
    """Counts towards `tune.trials`: complete, pruned, or failed for a reason of its own.

    A trial failed because its worker died does not count: its retry takes its place.
    """
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs


def count_finished(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if finished(t))


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective, params, duration, reason, run dir."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
                "last_reported_step": last_step,
                "duration_s": duration,
                "reason": t.user_attrs.get("fail_reason", "") or _retry_note(t),
                "counts": finished(t),
                "run_dir": t.user_attrs.get("run_dir", ""),
            }
        )
    return rows


def _retry_note(trial: Any) -> str:
    """Why a trial without a reason of its own failed or ran: its worker died, or it is such a trial's retry."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return "stopped by its worker's death or a machine fault; retried"
    if "failed_trial" in trial.system_attrs:
        return f"retry of trial {trial.system_attrs['failed_trial']}"
    return ""


def best_overrides(study: Any) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in study.best_trial.params.items()]


def write_outputs(study: Any, recipe_path: Path, base_overrides: list[str], recipe: Recipe, study_dir: StudyDir) -> dict[str, Any]:
    """best.yaml (ready for `llmctl train`), trials.csv, the plots and summary.json; returns the summary."""
    from optuna.trial import TrialState

    from llmctl.config.loader import load_recipe, recipe_to_yaml

    rows = trial_rows(study)
    params = sorted({k for r in rows for k in r["params"]})
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["number", "state", "value", *params, "last_reported_step", "duration_s", "reason", "run_dir"])
    for r in rows:
        writer.writerow([r["number"], r["state"], r["value"], *[r["params"].get(p, "") for p in params],
                         r["last_reported_step"], r["duration_s"], r["reason"], r["run_dir"]])
    write_atomic(study_dir.trials_csv, table.getvalue())

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "study": study.study_name,
        "direction": recipe.tune.direction,
        "objective": recipe.tune.objective,
        "trials": {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "pruned", "fail", "running", "waiting")},
        "best": None,
        "best_recipe": None,
        "trials_csv": str(study_dir.trials_csv),
        "plots": [],
    }
    if complete:
        best = study.best_trial
        # The winning recipe: the study's recipe with its overrides and the best values, as absolute
        # paths and a run name of its own, so `llmctl train best.yaml` runs from anywhere.
        winner = load_recipe(recipe_path, [*base_overrides, *best_overrides(study)])
        winner.run.name = f"{recipe.name}-best"
        winner.data.dir = str(recipe.data_dir().resolve())
        winner.data.sources = [s.model_copy(update={"path": _absolute(s.path)}) for s in winner.data.sources]
        winner.tune.space = {}
        write_atomic(study_dir.best_recipe, f"# best trial {best.number} of study {study.study_name}: "
                     f"{recipe.tune.objective} {best.value:.6g}\n" + recipe_to_yaml(winner))
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params, "run_dir": best.user_attrs.get("run_dir")}
        summary["best_recipe"] = str(study_dir.best_recipe)
        summary["plots"] = _plots(study, study_dir)
    write_atomic(study_dir.summary, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _absolute(path: str) -> str:
    return path if path.startswith("builtin:") else str(Path(path).resolve())


def _plots(study: Any, study_dir: StudyDir) -> list[str]:
    """Optimisation history and parameter importances as PNG files (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    written = []
    ax = plot_optimization_history(study)
    ax.figure.savefig(study_dir.plot("history"), dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    written.append(str(study_dir.plot("history")))
    complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    if len(complete) >= 2 and study.best_trial.params:
        try:
            ax = plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError):
            return written  # too few distinct trials to rank parameters
        ax.figure.savefig(study_dir.plot("importances"), dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(str(study_dir.plot("importances")))
    return written
