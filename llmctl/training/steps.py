"""How long a run is and how often it evaluates, in optimizer steps."""

from __future__ import annotations

import math

from llmctl.config.schema import TrainConfig

# A run whose recipe evaluates less often than the run is long gets about this many evaluations instead.
EVALS_IN_A_SHORT_RUN = 5


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over `examples` in batches of `batch_size` (rounded up, at least 1)."""
    return max(1, math.ceil(epochs * examples / batch_size))


def scaled_eval_every(cfg: TrainConfig, max_steps: int, steps_per_epoch: int | None) -> tuple[int, str | None]:
    """The evaluation interval (steps) a run of `max_steps` uses, and a note when it is not train.eval_every.

    An eval_every beyond the run's length (a recipe written for more data or steps) would evaluate once,
    at the end, leaving best-model selection and early stopping nothing to choose from: such a run
    evaluates once an epoch when it trains 2 or more epochs, else EVALS_IN_A_SHORT_RUN times. An
    eval_every equal to max_steps is a deliberate single evaluation and is kept.
    """
    if cfg.eval_every <= max_steps or max_steps < 2:
        return cfg.eval_every, None
    if cfg.epochs and cfg.epochs >= 2 and steps_per_epoch and steps_per_epoch < max_steps:
        every, how = steps_per_epoch, "once an epoch"
    else:
        every = math.ceil(max_steps / EVALS_IN_A_SHORT_RUN)
        how = f"{math.ceil(max_steps / every)} evaluations"
    note = (
        f"train.eval_every ({cfg.eval_every}) is beyond this run's {max_steps} steps, so it would evaluate only at the "
        f"end: evaluating every {every} steps ({how}) instead; set train.eval_every={max_steps} for one evaluation"
    )
    return every, note
