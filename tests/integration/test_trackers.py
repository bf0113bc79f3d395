"""train.log_with: TensorBoard gets the rows metrics.jsonl gets; a missing tracker package is refused up front."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from llmctl.errors import EXIT_BAD_INPUT, LlmctlError
from llmctl.training import trackers
from tests.integration.conftest import assert_clean_failure, metrics, run_cli


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard shows for a run dir: its event files read in order, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({events.parent for events in event_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_gets_the_metrics_rows(workdir: Path) -> None:
    pytest.importorskip("tensorboard")
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=6", "model.n_layer=1", "train.log_with=[tensorboard]")
    run = workdir / "runs/tiny"
    rows = metrics(run)
    scalars = _scalars(run / "tiny")  # Accelerate's TensorBoard tracker: <project_dir>/<run name>/
    for key in ("loss", "val_loss", "lr", "grad_norm"):
        expected = [(r["step"], r[key]) for r in rows if key in r]
        assert expected, key
        got = sorted(scalars[key])
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key
    assert "- tensorboard" in (run / "recipe.yaml").read_text()


def test_resume_and_overwrite_keep_tensorboard_in_step_with_metrics(workdir: Path) -> None:
    pytest.importorskip("tensorboard")
    args = ("train", "tiny.yaml", "train.max_steps=6", "train.checkpoint_every=3", "train.log_every=1",
            "model.n_layer=1", "train.log_with=[tensorboard]")
    run_cli(workdir, *args)
    run = workdir / "runs/tiny"
    shutil.rmtree(run / "checkpoints/step-6")  # as if killed after logging step 6, before its checkpoint
    run_cli(workdir, *args, "--resume")
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(s for s, _ in _scalars(run / "tiny")["loss"]) == steps  # steps 4-6 once: the first run's purged

    run_cli(workdir, *args[:2], "train.max_steps=2", *args[3:], "--overwrite")
    assert sorted(s for s, _ in _scalars(run / "tiny")["loss"]) == [1, 2]  # nothing of the run it replaced


def test_no_tracker_writes_no_tracker_files(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=2", "model.n_layer=1")
    assert not (workdir / "runs/tiny/tiny").exists()


def test_a_missing_tracker_package_is_refused_before_training(workdir: Path) -> None:
    missing = next((name for name in ("mlflow", "wandb") if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("mlflow and wandb are both installed")
    proc = run_cli(workdir, "train", "tiny.yaml", f"train.log_with=[{missing}]", check=False)
    assert_clean_failure(proc, 2, f"train.log_with: {missing} needs the {missing} package: pip install {missing}")
    assert not (workdir / "runs/tiny").exists()


def test_an_unknown_tracker_name_is_a_recipe_error(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "train.log_with=[tensorbored]", check=False)
    assert_clean_failure(proc, 2, "train.log_with")
    assert not (workdir / "runs/tiny").exists()


def test_check_trackers_names_each_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackers, "is_importable", lambda module: False)
    with pytest.raises(LlmctlError) as err:
        trackers.check_trackers(["tensorboard", "wandb"])
    assert err.value.exit_code == EXIT_BAD_INPUT
    message = str(err.value)
    assert "train.log_with: tensorboard needs the tensorboard package: pip install tensorboard" in message
    assert "train.log_with: wandb needs the wandb package: pip install wandb" in message
    monkeypatch.setattr(trackers, "is_importable", lambda module: module == "tensorboardX")
    trackers.check_trackers(["tensorboard"])  # tensorboardX also serves Accelerate's TensorBoard tracker


def test_flat_config_gives_trackers_scalars() -> None:
    flat = trackers.flat_config({"train": {"lr": 0.1, "betas": [0.9, 0.95], "lora": None}, "run": {"name": "x"}})
    assert flat == {"train.lr": 0.1, "train.betas": "[0.9, 0.95]", "train.lora": None, "run.name": "x"}
