"""Where a run is (`TrainState`, what a checkpoint's trainer_state.json holds beside Accelerate's state)
and the early stopping that reads and updates it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from llmctl.config.schema import TrainConfig

# Eval figures where higher is better; every other (val_loss) is minimised.
MAXIMIZED = {"val_accuracy", "val_f1"}


@dataclass
class TrainState:
    """The step (which is also the data position: a step's batch depends only on the seed and the step),
    what was seen so far, and early stopping's record. Checkpoints written before a field existed load
    with its default."""

    step: int = 0
    tokens: int = 0
    examples: int = 0
    elapsed_s: float = 0.0  # training time of the run so far, over every resume
    best_val_loss: float | None = None  # the val loss at best_step
    best_monitor: float | None = None  # train.monitor's best value
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one
    skipped: int = 0  # steps skipped for a NaN/inf loss or gradient (train.skip_nonfinite)
    lora_base: str | None = None  # a LoRA run's frozen base weights (their fingerprint); None without LoRA

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any]) -> "TrainState":
        """The state a checkpoint's trainer_state.json recorded; keys it lacks take their defaults."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        state.examples = state.examples or 0  # null in some older checkpoints
        return state

    def to_dict(self) -> dict[str, Any]:
        """What trainer_state.json records (lora_base only for a LoRA run)."""
        saved = asdict(self)
        if saved["lora_base"] is None:
            del saved["lora_base"]
        return saved


def monitor_is_better(monitor: str, value: float, best: float | None, min_delta: float) -> bool:
    """Whether `value` of `monitor` improves on `best` by more than `min_delta` (loss down, scores up)."""
    if best is None:
        return True
    return value > best + min_delta if monitor in MAXIMIZED else value < best - min_delta


class EarlyStopping:
    """train.monitor's best value so far (kept in the state, so a resumed run goes on counting) and
    whether train.patience evaluations have passed without a better one."""

    def __init__(self, cfg: TrainConfig, state: TrainState):
        self.cfg, self.state = cfg, state

    def update(self, figures: Mapping[str, float], step: int) -> bool:
        """Record an evaluation at `step`; True when it is the best so far."""
        cfg, state = self.cfg, self.state
        value = figures[cfg.monitor]
        best = state.best_monitor if state.best_monitor is not None else (
            state.best_val_loss if cfg.monitor == "val_loss" else None)  # checkpoints older than best_monitor
        if monitor_is_better(cfg.monitor, value, best, cfg.min_delta):
            state.best_monitor, state.best_val_loss, state.best_step, state.bad_evals = value, figures["val_loss"], step, 0
            return True
        state.bad_evals += 1
        return False

    def best_figures(self) -> dict[str, float]:
        """The best values an eval row of metrics.jsonl records beside its own figures."""
        best = {"best_val_loss": round(self.state.best_val_loss, 6)}
        if self.cfg.monitor != "val_loss":
            best[f"best_{self.cfg.monitor}"] = round(self.state.best_monitor, 6)
        return best

    def stop_message(self, step: int) -> str | None:
        """Why the run stops at `step`, or None while patience lasts (or without train.patience)."""
        cfg, state = self.cfg, self.state
        if cfg.patience is None or state.bad_evals < cfg.patience:
            return None
        return (f"early stopping at step {step}: {cfg.monitor} has not improved by {cfg.min_delta} "
                f"for {cfg.patience} evaluations (best {state.best_monitor:.4f} at step {state.best_step})")
