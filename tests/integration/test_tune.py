"""`llmctl tune` on a tiny study: pruning that really acts, failures recorded, best.yaml, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.integration.conftest import FAULTS, assert_clean_failure, run_cli

TUNE = """\
run: {{seed: 0}}
data: {{sources: [corpus], vocab_size: 300, val_fraction: 0.2}}
model: {{n_layer: 2, n_head: 2, d_model: 32, context_length: 32}}
train: {{max_steps: 30, batch_size: 8, eval_every: 5, log_every: 5, checkpoint_every: 100, eval_batches: 4,
        optimizer: sgd, momentum: 0.9, grad_clip: 0, schedule: constant}}
tune:
  trials: {trials}
  seed: 3
  startup_trials: 3
  pruner_startup_trials: 2
  heartbeat_s: 1
  space:
    train.lr: {{type: float, low: 1.0e-3, high: 10.0, log: true}}
"""


def _study(workdir: Path, name: str = "tune") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'runs' / name / 'study.db'}")


@pytest.fixture
def tune_dir(workdir: Path) -> Path:
    (workdir / "tune.yaml").write_text(TUNE.format(trials=10))
    return workdir


def test_a_tiny_study_prunes_fails_divergence_and_finds_the_good_region(tune_dir: Path) -> None:
    out = run_cli(tune_dir, "tune", "tune.yaml", "--json", timeout=600)
    summary = json.loads(out.stdout)
    study = _study(tune_dir)
    # Without a terminal one line per finished trial, with the study's count and ETA.
    progress = re.findall(r"\((\d+)/10 trials, eta (\d+m)?\d+s\)", out.stderr)
    assert [int(n) for n, _ in progress] == list(range(1, 11)), out.stderr
    trials = study.get_trials()
    assert len(trials) == 10 and summary["trials"]["complete"] >= 2

    # Each pruned trial was worse, at the step it was pruned, than the median of the trials
    # completed before it at that step: the median pruner's threshold.
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the pruner never acted"
    for t in pruned:
        step = max(t.intermediate_values)
        earlier = [c for c in trials if c.state == TrialState.COMPLETE and c.datetime_complete < t.datetime_complete and step in c.intermediate_values]
        threshold = statistics.median(c.intermediate_values[step] for c in earlier)
        assert t.intermediate_values[step] > threshold, (t.number, step)

    # The divergent region (SGD with momentum, lr of several units) never completes.
    divergent = [t for t in trials if t.params["train.lr"] > 3.0]
    assert divergent, "the sampler never visited the divergent region"
    for t in divergent:
        assert t.state in (TrialState.FAIL, TrialState.PRUNED), (t.number, t.params, t.state)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("fail_reason") for t in failed)

    best = study.best_trial
    assert 0.02 <= best.params["train.lr"] <= 2.0
    assert summary["best"]["number"] == best.number

    sdir = tune_dir / "runs/tune"
    for name in ("best.yaml", "trials.csv", "history.png", "importances.png", "summary.json"):
        assert (sdir / name).is_file(), name
    assert (sdir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((sdir / "trials.csv").read_text().strip().splitlines()) == 11
    assert (sdir / f"trials/trial-{best.number:04d}/metrics.jsonl").is_file()

    # best.yaml is a whole recipe with the winning value, ready to train from anywhere.
    elsewhere = tune_dir / "elsewhere"
    elsewhere.mkdir()
    trained = json.loads(run_cli(elsewhere, "train", str(sdir / "best.yaml"), "--json").stdout)
    assert trained["step"] == 30
    recipe = (elsewhere / "runs/tune-best/recipe.yaml").read_text()
    assert f"lr: {best.params['train.lr']}" in recipe

    # Run again: the study's total is reached, nothing reruns.
    again = run_cli(tune_dir, "tune", "tune.yaml", "--json")
    assert len(_study(tune_dir).get_trials()) == 10
    assert "all 10 trials are done" in again.stderr


def test_a_study_killed_with_sigkill_resumes_keeping_its_completed_trials(workdir: Path) -> None:
    (workdir / "tune.yaml").write_text(TUNE.format(trials=6))
    # Slow steps (injected) keep a trial running long enough to be killed in; the resume runs at full speed.
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": path, "LLMCTL_TEST_FAULT": "slow-forward:150"}
    parent = subprocess.Popen([sys.executable, "-m", "llmctl", "tune", "tune.yaml"], cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = workdir / "runs/tune/study.db"
    deadline = time.monotonic() + 300
    done_before: dict[int, float | None] = {}
    storage = None
    while time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.5)
        if storage is None and db.is_file():
            storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_table_creation=True, skip_compatibility_check=True)
        if storage is not None:
            try:
                trials = optuna.load_study(study_name="tune", storage=storage).get_trials()
            except Exception:  # the study is being created, or the file is locked for a moment
                continue
            finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
            if len(finished) >= 2 and any(t.state == TrialState.RUNNING for t in trials):
                done_before = {t.number: t.value for t in finished}
                break
    assert parent.poll() is None and done_before, "the study ended before it could be killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(1)

    out = run_cli(workdir, "tune", "tune.yaml", "--json", timeout=600)
    trials = _study(workdir).get_trials()
    for number, value in done_before.items():
        assert trials[number].value == value  # kept, not rerun
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "fail_reason" in t.user_attrs]
    assert len(counted) == 6
    dead = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    assert dead, "the trial running at the kill was not detected as dead"
    retried = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) in {d.number for d in dead}]
    assert retried and retried[0].params == dead[0].params
    assert json.loads(out.stdout)["best"] is not None


def test_a_trial_left_running_by_a_dead_worker_is_failed_and_rerun_even_once_the_study_is_complete(workdir: Path) -> None:
    (workdir / "tune.yaml").write_text(TUNE.format(trials=1).replace("heartbeat_s: 1", "heartbeat_s: 600"))
    run_cli(workdir, "tune", "tune.yaml")
    # What `llmctl tune` and its worker leave when both are killed with SIGKILL mid-trial: a RUNNING trial
    # whose worker process on this host has ended, long before its heartbeat (grace period 30 min) goes stale.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    study = _study(workdir)
    orphan = study.ask()
    lr = orphan.suggest_float("train.lr", 1.0e-3, 10.0, log=True)
    orphan.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid, "started": 1})

    out = run_cli(workdir, "tune", "tune.yaml", "--json")
    assert f"trial {orphan.number}: its worker is gone" in out.stderr
    trials = _study(workdir).get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == orphan.number]
    assert retry.params == {"train.lr": lr} and retry.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    summary = json.loads(out.stdout)
    assert summary["trials"]["running"] == 0 and summary["trials"]["waiting"] == 0
    rows = (workdir / "runs/tune/trials.csv").read_text().splitlines()
    assert any(row.startswith(f"{orphan.number},fail,") and "retried" in row for row in rows)


@pytest.mark.parametrize(
    "space, needle",
    [
        ("train.lrr: {type: float, low: 0.1, high: 1}", "tune.space.train.lrr: unknown recipe key; did you mean train.lr?"),
        ("train.optimizer: {type: categorical, choices: []}", "non-empty choices"),
        ("train.lr: {type: float, low: 0.5, high: 0.1}", "low (0.5) is above high (0.1)"),
        ("train.weight_decay: {type: float, low: 0.0, high: 0.1, log: true}", "log scale needs low > 0"),
    ],
)
def test_bad_search_spaces_are_refused_with_file_line_and_key(workdir: Path, space: str, needle: str) -> None:
    text = TUNE.format(trials=2).replace("train.lr: {type: float, low: 1.0e-3, high: 10.0, log: true}", space)
    (workdir / "tune.yaml").write_text(text)
    line = text.splitlines().index("    " + space) + 1
    proc = run_cli(workdir, "tune", "tune.yaml", check=False)
    assert_clean_failure(proc, 2, f"tune.yaml:{line}", needle)
    assert not (workdir / "runs").exists()


def test_a_storage_url_that_cannot_be_opened(tune_dir: Path) -> None:
    proc = run_cli(tune_dir, "tune", "tune.yaml", "--storage", "sqlite:////nonexistent/dir/study.db", check=False)
    assert_clean_failure(proc, 2, "--storage sqlite:////nonexistent/dir/study.db: cannot be opened")


def test_parallel_jobs_run_in_their_own_processes_with_a_share_of_the_cores(tune_dir: Path) -> None:
    (tune_dir / "tune.yaml").write_text(TUNE.format(trials=4).replace("pruner_startup_trials: 2", "pruner_startup_trials: 10"))
    run_cli(tune_dir, "tune", "tune.yaml", "--jobs", "2", timeout=600)
    trials = _study(tune_dir).get_trials()
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "fail_reason" in t.user_attrs]
    assert len(counted) >= 4
    workers = [t.user_attrs["worker"] for t in trials]
    assert {w["slot"] for w in workers} == {0, 1}
    assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
    cores = len(os.sched_getaffinity(0))
    assert all(w["threads"] == max(1, cores // 2) for w in workers)


def test_two_process_trials_report_from_rank_0_and_prune_together(tune_dir: Path) -> None:
    text = TUNE.format(trials=4).replace("tune:\n", "tune:\n  nproc_per_trial: 2\n").replace("startup_trials: 3", "startup_trials: 2")
    (tune_dir / "tune.yaml").write_text(text)
    run_cli(tune_dir, "tune", "tune.yaml", timeout=600)
    trials = _study(tune_dir).get_trials()
    assert len(trials) == 4 and any(t.state == TrialState.COMPLETE for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "no two-process trial was pruned"
    for t in pruned:
        step = t.user_attrs["pruned_at_step"]
        assert max(t.intermediate_values) == step  # rank 0 reported up to the step it pruned at
        rows = [json.loads(line) for line in (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows) == step  # and no rank trained past it
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert (run / "recipe.yaml").is_file()


@pytest.fixture
def small_disk(workdir: Path):
    """A 1.5 MiB tmpfs inside the work dir: a study on it runs out of space during its trials."""
    mount_point = workdir / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_stops_the_study_in_one_line_and_a_rerun_continues_it(workdir: Path, small_disk: Path) -> None:
    (workdir / "tune.yaml").write_text(TUNE.format(trials=6).replace("pruner_startup_trials: 2", "pruner_startup_trials: 10"))
    study_dir = small_disk / "study"
    proc = run_cli(workdir, "tune", "tune.yaml", "--study-dir", str(study_dir), "--json", check=False, timeout=600)
    assert_clean_failure(proc, 1, "no space left on device", "run the same `llmctl tune` command again")
    error = json.loads(proc.stdout)["error"]
    assert error["kind"] == "disk_full" and "\n" not in error["message"]
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{study_dir / 'study.db'}")
    given_back = [t for t in study.get_trials() if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    assert given_back, "the trial the full disk stopped was not given back"
    assert not any(t.state == TrialState.RUNNING for t in study.get_trials())
    assert not list(study_dir.rglob("*.tmp")), "a partial write was left on the full disk"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    out = run_cli(workdir, "tune", "tune.yaml", "--study-dir", str(study_dir), "--json", timeout=600)
    trials = optuna.load_study(study_name="tune", storage=f"sqlite:///{study_dir / 'study.db'}").get_trials()
    retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    assert {t.number for t in given_back} <= retried
    assert json.loads(out.stdout)["trials"]["running"] == 0
