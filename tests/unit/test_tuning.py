"""Unit tests for llmctl/tuning: sampling into overrides, what counts towards the total, space checks."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from llmctl.config.schema import Distribution, TuneConfig
from llmctl.errors import LlmctlError
from llmctl.tuning.study import check_space, count_finished, make_pruner, make_sampler
from llmctl.tuning.worker import suggest_overrides


def test_suggested_values_become_typed_overrides() -> None:
    space = {
        "train.lr": Distribution(type="float", low=1e-4, high=1e-2, log=True),
        "model.n_layer": Distribution(type="int", low=1, high=4),
        "train.optimizer": Distribution(type="categorical", choices=["adamw", "sgd"]),
    }
    trial = optuna.trial.FixedTrial({"train.lr": 0.003, "model.n_layer": 2, "train.optimizer": "sgd"})
    assert suggest_overrides(trial, space) == ["train.lr=0.003", "model.n_layer=2", 'train.optimizer="sgd"']


def test_dead_workers_failures_do_not_count_but_real_failures_do() -> None:
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=1.0))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"fail_reason": "diverged"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))  # its worker died
    assert count_finished(study) == 3


@pytest.mark.parametrize(
    "sampler, kind", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler")]
)
def test_samplers_by_name(sampler: str, kind: str) -> None:
    tune = TuneConfig(sampler=sampler, space={"train.lr": Distribution(type="float", low=0.1, high=1)})
    assert type(make_sampler(tune, seed=0)).__name__ == kind


def test_grid_sampler_needs_categorical_keys() -> None:
    tune = TuneConfig(sampler="grid", space={"train.lr": Distribution(type="float", low=0.1, high=1)})
    with pytest.raises(LlmctlError, match="grid needs categorical"):
        make_sampler(tune, seed=0)


def test_pruners_by_name() -> None:
    for name, kind in [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"), ("none", "NopPruner")]:
        assert type(make_pruner(TuneConfig(pruner=name), max_steps=100, eval_every=10)).__name__ == kind


def test_space_values_outside_the_recipe_schema_are_refused(tmp_path: Path) -> None:
    from llmctl.config import load_recipe

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("tune:\n  space:\n    train.lr: {type: float, low: 0.1, high: 50}\n")
    recipe = load_recipe(recipe_path)
    with pytest.raises(LlmctlError, match="the value 50.0 is not a valid train.lr: must be <= 10"):
        check_space(recipe_path, [], recipe)
