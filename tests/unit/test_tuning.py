"""Unit tests for llmctl/tuning: sampling into overrides, what counts towards the total, space checks."""

from __future__ import annotations

import multiprocessing
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest

from llmctl.config.schema import Distribution, TuneConfig
from llmctl.errors import LlmctlError
from llmctl.tuning.study import (
    check_space,
    count_finished,
    fail_dead_trials,
    make_pruner,
    make_sampler,
    open_storage,
    waiting_retries,
    worker_identity,
)
from llmctl.tuning.worker import suggest_overrides


def test_suggested_values_become_typed_overrides() -> None:
    space = {
        "train.lr": Distribution(type="float", low=1e-4, high=1e-2, log=True),
        "model.n_layer": Distribution(type="int", low=1, high=4),
        "train.optimizer": Distribution(type="categorical", choices=["adamw", "sgd"]),
    }
    trial = optuna.trial.FixedTrial({"train.lr": 0.003, "model.n_layer": 2, "train.optimizer": "sgd"})
    assert suggest_overrides(trial, space) == ["train.lr=0.003", "model.n_layer=2", 'train.optimizer="sgd"']


def test_dead_workers_failures_do_not_count_but_real_failures_do() -> None:
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=1.0))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"fail_reason": "diverged"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))  # its worker died
    assert count_finished(study) == 3


@pytest.mark.parametrize(
    "sampler, kind", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler")]
)
def test_samplers_by_name(sampler: str, kind: str) -> None:
    tune = TuneConfig(sampler=sampler, space={"train.lr": Distribution(type="float", low=0.1, high=1)})
    assert type(make_sampler(tune, seed=0)).__name__ == kind


def test_grid_sampler_needs_categorical_keys() -> None:
    tune = TuneConfig(sampler="grid", space={"train.lr": Distribution(type="float", low=0.1, high=1)})
    with pytest.raises(LlmctlError, match="grid needs categorical"):
        make_sampler(tune, seed=0)


def test_pruners_by_name() -> None:
    for name, kind in [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"), ("none", "NopPruner")]:
        assert type(make_pruner(TuneConfig(pruner=name), max_steps=100, eval_every=10)).__name__ == kind


def test_space_values_outside_the_recipe_schema_are_refused(tmp_path: Path) -> None:
    from llmctl.config import load_recipe

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("tune:\n  space:\n    train.lr: {type: float, low: 0.1, high: 50}\n")
    recipe = load_recipe(recipe_path)
    with pytest.raises(LlmctlError, match="the value 50.0 is not a valid train.lr: must be <= 10"):
        check_space(recipe_path, [], recipe)


# --- the study's storage: created once, dead workers' trials failed and retried ---------------------------

CONCURRENT_OPENERS = 4
CREATION_ROUNDS = 12


def _open_at_the_barrier(url: str, barrier: Any, errors: Any) -> None:
    """A child process: wait for the others, then open the storage and the study as a worker does."""
    try:
        barrier.wait(timeout=60)
        storage = open_storage(url, TuneConfig())
        optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
        storage.engine.dispose()
    except BaseException as e:  # noqa: BLE001 - whatever it is, the parent reports it
        errors.put(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def test_processes_opening_a_new_study_dir_at_the_same_moment_create_it_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # the children share the parent's imports: a round costs little
    for round_ in range(CREATION_ROUNDS):
        db = tmp_path / f"round-{round_}" / "study.db"
        db.parent.mkdir()
        barrier, errors = context.Barrier(CONCURRENT_OPENERS), context.Queue()
        children = [context.Process(target=_open_at_the_barrier, args=(f"sqlite:///{db}", barrier, errors))
                    for _ in range(CONCURRENT_OPENERS)]
        for child in children:
            child.start()
        for child in children:
            child.join(timeout=120)
        failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
        assert not failures and all(c.exitcode == 0 for c in children), (round_, failures)
        assert len(optuna.get_all_study_summaries(f"sqlite:///{db}")) == 1
        assert sorted(p.name for p in db.parent.iterdir()) == ["study.db", "study.db.lock"]  # no staged file left


def test_a_study_file_never_exists_half_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmctl.tuning.study as study_module

    db = tmp_path / "study.db"
    seen = []
    real = study_module._rdb_storage

    def watching(url: str, tune: TuneConfig) -> Any:
        seen.append((url, db.exists()))
        return real(url, tune)

    monkeypatch.setattr(study_module, "_rdb_storage", watching)
    open_storage(f"sqlite:///{db}", TuneConfig()).engine.dispose()
    # Made under a staged name while study.db did not exist, then opened at its own name.
    assert [exists for _, exists in seen] == [False, True]
    assert seen[0][0] != f"sqlite:///{db}" and seen[1][0] == f"sqlite:///{db}"


def _running_trial(study: optuna.Study, worker: dict[str, Any]) -> optuna.trial.Trial:
    """A trial as a worker leaves it running (asked outside `optimize`, where Optuna warns about heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    trial.suggest_float("train.lr", 1e-3, 1.0, log=True)
    trial.set_user_attr("worker", worker)
    return trial


def _ended_process_identity() -> dict[str, Any]:
    """The identity a worker on this host had, for a process that has since exited."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return {"host": socket.gethostname(), "pid": child.pid, "started": 1}


def test_a_trial_whose_worker_on_this_host_is_gone_is_failed_at_once_and_retried_with_its_values(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", TuneConfig(heartbeat_s=600))
    study = optuna.create_study(study_name="s", storage=storage)
    dead = _running_trial(study, _ended_process_identity())
    alive = _running_trial(study, worker_identity())  # this test's own process: alive
    elsewhere = _running_trial(study, {"host": "another-host", "pid": 1, "started": 1})  # only a heartbeat can tell

    assert fail_dead_trials(study, storage) == [dead.number]  # the grace period (30 min) is not waited for
    trials = study.get_trials()
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert trials[alive.number].state == trials[elsewhere.number].state == optuna.trial.TrialState.RUNNING
    (retry,) = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == dead.number
    assert retry.params == trials[dead.number].params
    assert waiting_retries(study) == 1
    assert count_finished(study) == 0  # the dead trial does not count; its retry will
    assert fail_dead_trials(study, storage) == []  # nothing twice


def test_a_worker_leaving_gives_back_only_its_own_trial(tmp_path: Path) -> None:
    import os

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", TuneConfig(heartbeat_s=600))
    study = optuna.create_study(study_name="s", storage=storage)
    mine = _running_trial(study, worker_identity())
    other = _running_trial(study, {**worker_identity(), "pid": os.getppid()})
    assert fail_dead_trials(study, storage, only_pid=os.getpid()) == [mine.number]
    assert study.get_trials()[other.number].state == optuna.trial.TrialState.RUNNING
    assert waiting_retries(study) == 1


def test_a_storage_url_whose_driver_is_missing_names_the_driver_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import pg8000` raise ModuleNotFoundError, installed or not; SQLAlchemy
    # imports the driver before any connection is tried.
    monkeypatch.setitem(sys.modules, "pg8000", None)
    with pytest.raises(LlmctlError, match=r"database driver 'pg8000' is not installed \(pip install pg8000"):
        open_storage("postgresql+pg8000://user@127.0.0.1:1/db", TuneConfig())
