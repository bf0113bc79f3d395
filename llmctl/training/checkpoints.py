"""Resumable checkpoints: Accelerate's save_state/load_state in a step-N dir, written atomically.

A checkpoint dir holds what `Accelerator.save_state` writes (model, optimizer,
registered scheduler, RNG states of every process) plus `trainer_state.json`
(the step, which is also the data position, tokens seen and early-stopping state).
It is written under a temporary name and renamed when whole.

A LoRA run's checkpoints hold the adapters alone (`keep_adapters_only`): the frozen base weights
are model.init_from's (or the seed's) and come back from there on resume, so a checkpoint is a small
fraction of the model's size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llmctl.artifacts import (
    RunDir,
    append_line,
    iter_jsonl,
    read_json_artifact,
    replace_dir_atomic,
    usual_mode,
    write_atomic,
    write_json_atomic,
    writing,
)
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
    main = accelerator.is_main_process
    what = f"the checkpoint {final}"
    if main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with writing(what, final, partial=tmp if main else None):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if main:
        with writing(what, final, partial=tmp):
            for weights in tmp.glob("*.safetensors"):
                usual_mode(weights)  # safetensors writes through a private (0600) temporary
            write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
            replace_dir_atomic(tmp, final)
        for _, old in run_dir.step_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def keep_adapters_only(accelerator: Any) -> None:
    """Make `save_state` write only the LoRA adapter tensors of the model (the rest is frozen)."""
    from llmctl.training.lora import is_adapter_key

    def drop_frozen(models: list, weights: list, output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if is_adapter_key(k)}

    accelerator.register_save_state_pre_hook(drop_frozen)


def _check_adapters(path: Path, adapter_keys: set[str] | None) -> None:
    """Refuse a checkpoint whose weights are not what this run saves: the whole model, or (LoRA) the
    adapters on the same layers."""
    from safetensors import SafetensorError, safe_open

    from llmctl.training.lora import is_adapter_key

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            saved = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise LlmctlError(f"{path / 'model.safetensors'}: cannot be read ({e}); the checkpoint is damaged.") from None
    adapters = {k for k in saved if is_adapter_key(k)}
    if adapter_keys is None:
        if adapters:
            raise LlmctlError(f"{path}: holds LoRA adapters only, but the recipe has no train.lora; resume with the "
                              "recipe that made it, or pass --overwrite to start over.")
        return
    if adapters != saved:
        raise LlmctlError(f"{path}: holds the whole model's weights, but the recipe sets train.lora; resume with the "
                          "recipe that made it (train.lora: null), or pass --overwrite to start over.")
    if adapters != adapter_keys:
        def layers(keys: set[str]) -> str:
            return ", ".join(sorted({k.rsplit(".", 2)[-2] for k in keys}))

        raise LlmctlError(
            f"{path}: adapters on {len(adapters) // 2} layers ({layers(adapters)}), but train.lora.targets puts them "
            f"on {len(adapter_keys) // 2} ({layers(adapter_keys)}); resume with the recipe that made it, or pass --overwrite."
        )


def load_checkpoint(accelerator: Any, path: Path, adapter_keys: set[str] | None = None) -> dict[str, Any]:
    """Restore every process's state from `path`; a checkpoint of another model shape is refused.

    `adapter_keys` (a LoRA run): the state-dict keys of the model's adapters, the only weights the
    checkpoint holds; the frozen rest of the model is left as it is.
    """
    state = check_checkpoint(path)
    _check_adapters(Path(path), adapter_keys)
    try:
        accelerator.load_state(str(path), strict=adapter_keys is None)
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
        with writing(f"the metrics log {self.path}", self.path):
            write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        """One row, whole or not at all (a full disk is a WriteFailed, never a torn line)."""
        if not self.enabled:
            return
        with writing(f"the metrics log {self.path}", self.path):
            append_line(self.path, json.dumps(row) + "\n")
