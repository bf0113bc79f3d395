"""Experiment trackers (`train.log_with`): the up-front package check and the rows they get.

Accelerate does the tracking; it silently drops a tracker whose package is missing, so the
trainer checks here first and refuses the run with an install hint before any training starts.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from llmctl.errors import LlmctlError

# tracker -> (the modules any one of which will do, the package to install)
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}


def is_importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(log_with: list[str]) -> None:
    """Refuse (exit 2) a tracker whose package is not installed, naming what to install."""
    missing = [name for name in log_with if not any(is_importable(m) for m in TRACKER_PACKAGES[name][0])]
    if missing:
        raise LlmctlError("; ".join(
            f"train.log_with: {name} needs the {TRACKER_PACKAGES[name][1]} package: pip install {TRACKER_PACKAGES[name][1]}"
            for name in missing
        ) + " (or drop it from train.log_with).")


def flat_config(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The recipe as `section.key` -> scalar, as trackers' hyperparameter tables want (lists become JSON text)."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def tracker_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row without its step (passed apart) and anything that is not a number."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
