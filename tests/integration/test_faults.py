"""Crashes and bad steps: kill -9 and resume, a death mid-checkpoint, out-of-memory, NaN losses, and a full disk
or a refused permission at each write site (checkpoint, model dir, metrics, dataset shards, export files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.conftest import TINY_RECIPE, assert_clean_failure, metrics, run_cli, run_cli_with

LONG = TINY_RECIPE.format(max_steps=120).replace("n_layer: 2", "n_layer: 2, dropout: 0.1")
LONG = LONG.replace("eval_every: 5", "eval_every: 20").replace("checkpoint_every: 5", "checkpoint_every: 7")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints/step-120/model.safetensors"))


def test_kill_9_at_a_random_step_then_resume_is_bit_exact(workdir: Path) -> None:
    (workdir / "tiny.yaml").write_text(LONG)
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/whole")

    env = {**os.environ, "NO_COLOR": "1"}
    victim = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "train", "tiny.yaml", "--run-dir", "runs/killed"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    kill_after = 30 + int.from_bytes(os.urandom(1), "little") % 60  # a step between 30 and 89
    log = workdir / "runs/killed/metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if log.is_file() and sum(1 for line in log.read_text().splitlines() if '"loss"' in line) >= kill_after:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (workdir / "runs/killed/checkpoints/step-120").exists()

    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/killed", "--resume")
    assert _losses(workdir / "runs/killed") == _losses(workdir / "runs/whole")
    whole, killed = _final_weights(workdir / "runs/whole"), _final_weights(workdir / "runs/killed")
    assert all((whole[k] == killed[k]).all() for k in whole)


def test_death_between_checkpoint_write_and_rename_keeps_the_previous_one(workdir: Path) -> None:
    (workdir / "tiny.yaml").write_text(TINY_RECIPE.format(max_steps=15))
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/whole")
    died = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "die-before-rename:2"}, "train", "tiny.yaml", "--run-dir", "runs/cut", check=False)
    assert died.returncode == 137
    ckpts = workdir / "runs/cut/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-5"]
    assert (ckpts / ".step-10.tmp").is_dir()  # written whole, never named as a checkpoint
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/cut", "--resume")
    assert _losses(workdir / "runs/cut") == _losses(workdir / "runs/whole")
    assert not (ckpts / ".step-10.tmp").exists()


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_global_batch(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "train.micro_batch_size=2", "--run-dir", "runs/small")
    out = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "oom-above:2"}, "train", "tiny.yaml", "--run-dir", "runs/oom", "--json")
    result = json.loads(out.stdout)
    assert result["micro_batch_size"] == 2 and result["accumulation"] == 4
    assert "out of memory at step 1: retrying with micro-batch 2 x 4 accumulation" in out.stderr
    events = [r for r in metrics(workdir / "runs/oom") if r.get("event") == "out_of_memory"]
    assert events == [{"step": 1, "event": "out_of_memory", "micro_batch_size": 2, "accumulation": 4}]
    small, oom = _losses(workdir / "runs/small"), _losses(workdir / "runs/oom")
    assert len(small) == len(oom) == 10
    assert max(abs(a - b) for a, b in zip(small, oom)) < 1e-5


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeping_the_last_checkpoint(workdir: Path) -> None:
    # 2 micro-batches per step: forward call 15 is in step 8, after the step-5 checkpoint.
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "nan-at:15"}, "train", "tiny.yaml", check=False)
    assert_clean_failure(proc, 1, "NaN/inf at step 8", "step-5", "train.lr", "train.grad_clip", "train.skip_nonfinite")
    ckpts = sorted(p.name for p in (workdir / "runs/tiny/checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-5"]


def test_skip_nonfinite_skips_the_bad_batch_and_logs_it(workdir: Path) -> None:
    out = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "nan-at:15"}, "train", "tiny.yaml", "train.skip_nonfinite=1", "--json")
    assert json.loads(out.stdout)["skipped_nonfinite"] == 1
    rows = metrics(workdir / "runs/tiny")
    assert {"step": 8, "event": "nonfinite_skipped", "skipped": 1} in rows
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN reached the log


# --- a full disk, a refused permission: one line, exit 1, nothing partial left, --resume goes on -------------


def _one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("file", ["optimizer.bin", "model.safetensors"])
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_intact_one_and_resume_continues(workdir: Path, file: str) -> None:
    # optimizer.bin goes through torch.save, whose zip writer hides the errno ("unexpected pos ..."): the free
    # space says what happened; model.safetensors through safetensors, which says "(os error 28)".
    (workdir / "tiny.yaml").write_text(TINY_RECIPE.format(max_steps=15))
    fault = f"write-fails:ENOSPC:*/checkpoints/.step-10.tmp/{file}"
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": fault}, "train", "tiny.yaml", check=False)
    assert_clean_failure(proc, 1, f"cannot write the checkpoint runs/tiny/checkpoints/step-10 ({file}): no space left on device",
                         "free there", "The newest checkpoint, runs/tiny/checkpoints/step-5, is intact", "--resume")
    _one_error_line(proc)
    ckpts = workdir / "runs/tiny/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-5"]  # the partial .step-10.tmp is gone
    run_cli(workdir, "train", "tiny.yaml", "--resume")
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-10", "step-15", "step-5"]
    assert metrics(workdir / "runs/tiny")[-1]["step"] == 15


def test_a_full_disk_while_writing_the_final_model_dir_keeps_the_checkpoint_for_resume(workdir: Path) -> None:
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "write-fails:ENOSPC:*/runs/tiny/.model.*.tmp/*"}, "train", "tiny.yaml",
                        check=False)
    assert_clean_failure(proc, 1, "cannot write the model dir runs/tiny/model", "no space left on device",
                         "runs/tiny/checkpoints/step-10, is intact", "--resume")
    assert _temporaries(workdir / "runs") == [] and not (workdir / "runs/tiny/model").exists()
    run_cli(workdir, "train", "tiny.yaml", "--resume")
    assert (workdir / "runs/tiny/model/model.safetensors").is_file()


def test_a_full_disk_on_the_metrics_log_leaves_whole_rows_and_names_the_checkpoint(workdir: Path) -> None:
    # Rows: steps 1-5, the eval of step 5, step 6; the 8th append (step 7) meets the full disk.
    fault = "write-fails:ENOSPC:*/runs/tiny/metrics.jsonl@8"
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": fault}, "train", "tiny.yaml", check=False)
    assert_clean_failure(proc, 1, "cannot write the metrics log runs/tiny/metrics.jsonl: no space left on device",
                         "runs/tiny/checkpoints/step-5, is intact")
    assert [r["step"] for r in metrics(workdir / "runs/tiny")] == [1, 2, 3, 4, 5, 5, 6]


def test_a_refused_permission_on_the_run_dir_is_one_line(workdir: Path) -> None:
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "write-fails:EACCES:*/runs/tiny/metrics.jsonl"}, "train", "tiny.yaml",
                        check=False)
    assert_clean_failure(proc, 1, "cannot write the metrics log runs/tiny/metrics.jsonl: permission denied",
                         "No checkpoint was written yet: make it writable")
    assert "free there" not in proc.stderr


def test_a_full_disk_during_prepare_keeps_the_earlier_dataset_dir(workdir: Path) -> None:
    run_cli(workdir, "prepare", "tiny.yaml")
    before = {p.name: p.read_bytes() for p in (workdir / "data/tiny").iterdir()}
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "write-fails:ENOSPC:*/train.bin"}, "prepare", "tiny.yaml", "--force",
                        check=False)
    assert_clean_failure(proc, 1, "cannot write the dataset dir data/tiny (train.bin): no space left on device",
                         "The earlier data/tiny is unchanged")
    assert {p.name: p.read_bytes() for p in (workdir / "data/tiny").iterdir()} == before
    assert _temporaries(workdir / "data") == []


def test_a_full_disk_during_export_leaves_no_partial_export_dir(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=2")
    proc = run_cli_with(workdir, {"LLMCTL_TEST_FAULT": "write-fails:ENOSPC:*/model.onnx*"}, "export", "runs/tiny/model",
                        "-o", "out/onnx", check=False)
    assert_clean_failure(proc, 1, "cannot write the export dir out/onnx", "no space left on device")
    assert not (workdir / "out").exists() or list((workdir / "out").iterdir()) == []


def test_temporaries_a_killed_run_left_are_removed_when_it_resumes(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    run = workdir / "runs/tiny"
    # What kill -9 leaves mid-copy of model/ and mid-checkpoint: staging dirs with part of their files.
    (run / ".model.k2j4h_x1.tmp").mkdir()
    (run / ".model.k2j4h_x1.tmp/model.safetensors").write_bytes(b"\0" * 4096)
    (run / "checkpoints/.step-12.tmp").mkdir()
    proc = run_cli(workdir, "train", "tiny.yaml", "train.max_steps=12", "--resume")
    assert "removed 2 half-written temporary file(s)" in proc.stderr
    assert _temporaries(run) == []
