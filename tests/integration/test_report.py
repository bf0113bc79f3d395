"""`llmctl report` through the real CLI: a 10-step run, a compare of its model dirs and a 4-trial study,
each giving PNGs with drawn data, a self-contained report.html and figures that match what was logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.reporting.plots import TRAIN, VAL, model_colour
from tests.integration.conftest import metrics, run_cli
from tests.unit.test_reporting import assert_png, assert_self_contained, colour_pixels, saturated_pixels

TUNE = """\
run: {seed: 0}
data: {sources: [corpus], vocab_size: 300, val_fraction: 0.2}
model: {n_layer: 1, n_head: 2, d_model: 32, context_length: 32}
train: {max_steps: 10, batch_size: 8, eval_every: 5, log_every: 5, checkpoint_every: 100, eval_batches: 2}
tune:
  trials: 4
  seed: 3
  startup_trials: 3
  pruner_startup_trials: 2
  heartbeat_s: 1
  space:
    train.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
"""


def test_a_trained_run_is_reported_with_its_logged_figures_and_its_models_compared(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    rows = metrics(workdir / "runs/tiny")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])

    out = json.loads(run_cli(workdir, "report", "runs/tiny", "--json").stdout)
    assert out["kind"] == "run" and out["steps"] == 10 and out["evals"] == len(evals) == 2
    assert out["final_loss"] == steps[-1]["loss"]
    assert out["best_val_loss"] == best["val_loss"] and out["best_val_step"] == best["step"]
    assert out["tokens"] == steps[-1]["tokens"] == 10 * 8 * 32
    plots = {name: workdir / path for name, path in out["files"]["plots"].items()}
    assert set(plots) == {"loss", "lr", "throughput", "grad-norm"}
    for name, png in plots.items():
        assert_png(png)
        assert png.parent == workdir / "runs/tiny"
        assert colour_pixels(png, TRAIN) > 300, name
    assert colour_pixels(plots["loss"], VAL) > 200  # the val loss line between its two evaluations
    assert_self_contained(workdir / out["files"]["html"], {k: str(v) for k, v in plots.items()})

    human = run_cli(workdir, "report", "runs/tiny").stdout
    words = " ".join(human.split())
    assert "steps 10" in words and f"tokens {10 * 8 * 32:,}" in words and f"{best['val_loss']:.4f} at step {best['step']}" in words

    # A compare profiles as `eval --compare` does and lands in reports/compare-1.
    proc = run_cli(workdir, "report", "runs/tiny/model", "runs/tiny/checkpoints/best", "--max-tokens", "1024", "--json")
    out = json.loads(proc.stdout)
    assert out["kind"] == "compare" and out["tokens"] == 1024
    assert [r["name"] for r in out["rows"]] == ["runs/tiny/model", "runs/tiny/checkpoints/best"]
    assert all(r["perplexity"] > 1 and r["size_bytes"] > 0 for r in out["rows"])
    assert out["files"]["html"] == "reports/compare-1/report.html"
    plots = {name: workdir / path for name, path in out["files"]["plots"].items()}
    assert set(plots) == {"size-vs-perplexity", "latency-vs-perplexity"}
    for png in plots.values():
        assert_png(png)
        assert colour_pixels(png, model_colour(0)) > 40
    assert_self_contained(workdir / out["files"]["html"], {k: str(v) for k, v in plots.items()})
    assert "perplexity" in proc.stderr and "runs/tiny/checkpoints/best" in proc.stderr  # the compare table


def test_a_tuned_study_is_reported_from_its_storage(workdir: Path) -> None:
    (workdir / "tune.yaml").write_text(TUNE, encoding="utf-8")
    summary = json.loads(run_cli(workdir, "tune", "tune.yaml", "--json", timeout=300).stdout)
    out = json.loads(run_cli(workdir, "report", "runs/tune", "--json").stdout)
    assert out["kind"] == "study" and out["study"] == "tune"
    assert out["best"]["number"] == summary["best"]["number"]
    assert out["best"]["value"] == pytest.approx(summary["best"]["value"])
    assert out["trials"] == summary["trials"]
    plots = {name: workdir / path for name, path in out["files"]["plots"].items()}
    assert {"history", "parallel", "curves"} <= set(plots)
    for name, png in plots.items():
        assert_png(png)
        assert saturated_pixels(png) > 300, name
    assert colour_pixels(plots["parallel"], VAL) > 200  # the best trial's line
    assert_self_contained(workdir / out["files"]["html"], {k: str(v) for k, v in plots.items()})
    assert (workdir / "runs/tune/history.png").is_file()  # tune's own plot, left as it was
