"""A trial trained by several processes: rank 0 talks to Optuna, every rank prunes together.

The tuning worker runs `llmctl train --nproc N` for the trial with LLMCTL_TUNE_TRIAL set; in
each rank, `train` reports through `RankZeroTrialReporter`. All ranks hold the same reduced
objective after an evaluation; rank 0 reports it and asks the pruner, then broadcasts the
answer, so all ranks raise `TrialStopped` at the same step and no collective is left waiting.
Rank 0 also records the step as the trial's `pruned_at_step`, which the worker reads once the
launcher has exited (its exit status cannot carry a code of our own through torchrun).
"""

from __future__ import annotations

import json
import os
from typing import Any

from llmctl.training.trainer import TrainCallbacks

TRIAL_ENV = "LLMCTL_TUNE_TRIAL"


class TrialStopped(Exception):
    """The pruner stopped this trial (raised on every rank at the same evaluation)."""


def trial_context() -> dict[str, Any] | None:
    raw = os.environ.get(TRIAL_ENV)
    return json.loads(raw) if raw else None


class RankZeroTrialReporter(TrainCallbacks):
    def __init__(self, context: dict[str, Any], inner: TrainCallbacks):
        self.context = context
        self.inner = inner
        self.trial = None

    def _trial(self) -> Any:
        if self.trial is None:
            import optuna

            from llmctl.config.loader import load_recipe
            from llmctl.tuning.study import open_storage, open_study

            recipe = load_recipe(self.context["recipe"], self.context["overrides"])
            study = open_study(recipe, open_storage(self.context["storage"], recipe.tune))
            self.trial = optuna.trial.Trial(study, self.context["trial_id"])
        return self.trial

    def on_start(self, info: dict[str, Any]) -> None:
        self.inner.on_start(info)

    def on_step(self, step: int, row: dict[str, Any] | None) -> None:
        self.inner.on_step(step, row)

    def on_message(self, text: str) -> None:
        self.inner.on_message(text)

    def on_eval(self, row: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        self.inner.on_eval(row)
        objective = self.context["objective"]
        prune = False
        if int(os.environ.get("RANK", "0")) == 0 and objective in row:
            trial = self._trial()
            trial.report(float(row[objective]), row["step"])
            prune = row["step"] < self.context["max_steps"] and trial.should_prune()
            if prune:
                trial.set_user_attr("pruned_at_step", row["step"])
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if prune else 0])
            dist.broadcast(flag, src=0)
            prune = bool(flag.item())
        if prune:
            raise TrialStopped(f"pruned at step {row['step']}")
