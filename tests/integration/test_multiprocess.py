"""`llmctl train --nproc 2`: two gloo processes through accelerate launch, checked against one process."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from tests.integration.conftest import TINY_RECIPE, assert_clean_failure, metrics, run_cli, run_cli_with

# SGD with dropout 0 and a constant lr: one process and two must agree to rounding (NOTES.md).
SGD = ["train.optimizer=sgd", "train.momentum=0.9", "train.schedule=constant", "train.warmup_steps=0", "train.lr=0.05"]


def _weights(run: Path) -> dict:
    step = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    return load_file(str(run / "checkpoints" / f"step-{step}" / "model.safetensors"))


def _traces(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in folder.glob("rank-*.jsonl")}


def test_two_processes_split_each_batch_match_one_process_and_write_apart(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", *SGD, "--run-dir", "runs/one")
    trace = workdir / "trace"
    trace.mkdir()
    out = run_cli_with(workdir, {"LLMCTL_TEST_TRACE": str(trace)}, "train", "tiny.yaml", *SGD, "--run-dir", "runs/two", "--nproc", "2", "--json")
    result = json.loads(out.stdout)  # one JSON object: rank 0 alone printed
    assert result["step"] == 10

    traces = _traces(trace)
    assert {"rank-0", "rank-1"} <= set(traces)
    # (a) each rank reads its own half of every global batch.
    for step in range(10):
        rows = {r: next(t["starts"] for t in traces[r] if t.get("step") == step) for r in ("rank-0", "rank-1")}
        assert len(rows["rank-0"]) == len(rows["rank-1"]) == 4
        assert rows["rank-0"] != rows["rank-1"]
    # (b) the weights equal a one-process run on the same global batch.
    one, two = _weights(workdir / "runs/one"), _weights(workdir / "runs/two")
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max().item() < 1e-5, name
    # (c) no two ranks write the same file; logs, metrics and model dir come from rank 0 alone.
    writes = {r: {t["write"] for t in traces[r] if "write" in t} for r in ("rank-0", "rank-1")}
    assert not writes["rank-0"] & writes["rank-1"]
    run_dir = str((workdir / "runs/two").resolve())
    rank1_in_run = {w for w in writes["rank-1"] if w.startswith(run_dir)}
    assert all("random_states_1" in w for w in rank1_in_run), rank1_in_run
    assert any(w.endswith("metrics.jsonl") for w in writes["rank-0"])
    assert any("/model/" in w or "/.model." in w or "checkpoints/.best" in w for w in writes["rank-0"])
    # metrics are written once per step, not once per rank
    assert [r["step"] for r in metrics(workdir / "runs/two") if "loss" in r] == list(range(1, 11))


def test_resuming_a_two_process_run_continues_with_the_same_losses(workdir: Path) -> None:
    recipe = TINY_RECIPE.format(max_steps=10).replace("n_layer: 2", "n_layer: 2, dropout: 0.1")
    (workdir / "tiny.yaml").write_text(recipe + "  schedule: constant\n")
    run_cli(workdir, "train", "tiny.yaml", "--nproc", "2", "--run-dir", "runs/whole")
    run_cli(workdir, "train", "tiny.yaml", "--nproc", "2", "train.max_steps=5", "--run-dir", "runs/cut")
    run_cli(workdir, "train", "tiny.yaml", "--nproc", "2", "--run-dir", "runs/cut", "--resume")
    whole, cut = metrics(workdir / "runs/whole"), metrics(workdir / "runs/cut")
    assert [r["loss"] for r in cut if "loss" in r] == [r["loss"] for r in whole if "loss" in r]
    assert [r["val_loss"] for r in cut if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r]


def test_a_batch_three_processes_cannot_split_is_refused_once_before_any_starts(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "train.micro_batch_size=8", "--nproc", "3", check=False)
    assert_clean_failure(proc, 2, "train.batch_size (8) must be a multiple of the process count (3)")
    assert proc.stderr.count("error:") == 1 and "launching" not in proc.stderr
    assert not (workdir / "data").exists() and not (workdir / "runs").exists()  # refused before prepare too
    (workdir / "big.yaml").write_text((workdir / "tiny.yaml").read_text().replace("batch_size: 8", "batch_size: 24"))
    proc = run_cli(workdir, "train", "big.yaml", "train.micro_batch_size=8", "--nproc", "2", check=False)
    assert_clean_failure(proc, 2, "micro_batch_size x processes (8 x 2); choose a train.micro_batch_size that divides 12")
    assert "launching" not in proc.stderr
