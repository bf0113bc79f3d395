"""Resumable checkpoints: Accelerate's save_state/load_state in a step-N dir, written atomically.

A checkpoint dir holds what `Accelerator.save_state` writes (model, optimizer,
registered scheduler, RNG states of every process) plus `trainer_state.json`
(the step, which is also the data position, tokens seen and early-stopping state).
It is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llmctl.artifacts import RunDir, iter_jsonl, read_json_artifact, replace_dir_atomic, write_atomic, write_json_atomic
from llmctl.errors import LlmctlError

STATE_FILE = "trainer_state.json"
REQUIRED = (STATE_FILE, "model.safetensors", "optimizer.bin")


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Refuse a dir that is not a whole checkpoint; return its trainer state."""
    path = Path(path)
    if not path.is_dir():
        raise LlmctlError(f"{path}: no such checkpoint dir.")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise LlmctlError(
            f"{path}: not a checkpoint (missing {', '.join(missing)}); a checkpoint is a "
            "checkpoints/step-N/ dir written by `llmctl train`. Remove it or pass --overwrite to start over."
        )
    state = read_json_artifact(path / STATE_FILE, "checkpoint")
    if not isinstance(state.get("step"), int):
        raise LlmctlError(f"{path / STATE_FILE}: has no integer 'step'; the checkpoint is damaged.")
    return state


def save_checkpoint(accelerator: Any, run_dir: RunDir, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint of every process's state for `step`, then keep only the newest `keep`."""
    final = run_dir.checkpoint(step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
        replace_dir_atomic(tmp, final)
        for _, old in run_dir.step_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore every process's state from `path`; a checkpoint of another model shape is refused."""
    state = check_checkpoint(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmctlError(
            f"{path}: cannot be loaded into this recipe's model ({first[:300]}); it was written for another "
            "model shape or optimizer. Resume with the recipe that made it, or pass --overwrite to start over."
        ) from None
    return state


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`, so a resumed run's log reads as if never interrupted."""
        if not self.enabled:
            return
        kept = [row for row in iter_jsonl(self.path) if row.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
