"""Model families by name, and the model each builds for a task, so a new one plugs in without touching the trainer.

A family registers a builder per task: a function that takes a config dict (config.json, or a shape's
`to_dict()`) and returns an `nn.Module`. The `gpt` family builds a decoder language model for `lm` and
`instruct` and the decoder with a classification head for `classification`; `rnn`, `lstm` and `gru`
build recurrent classifiers. A language model's forward takes token ids (B, T) and returns logits
(B, T, V); a classifier takes right-padded token ids (B, T) and lengths (B,) and returns logits (B, 1)
for two classes, else (B, num_classes). The task of a config dict is its `task` key (older model dirs:
see `llmctl.tasks.task_of_config`). Builders are imported only when a model is built, so importing the
registry stays free of torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from llmctl.errors import LlmctlError
from llmctl.models.shapes import RECURRENT_FAMILIES

LANGUAGE_TASKS = ("lm", "instruct")


@dataclass(frozen=True)
class ModelFamily:
    """A family's name and, per task, the `(module, function)` that builds its model."""

    name: str
    builders: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def build(self, config: Mapping[str, Any], task: str) -> Any:
        """The untrained model of `config` for `task`."""
        if task not in self.builders:
            raise LlmctlError(f"model family {self.name!r} builds no {task} model (it builds: {', '.join(self.builders)}).")
        module, function = self.builders[task]
        build: Callable[[dict[str, Any]], Any] = getattr(importlib.import_module(module), function)
        return build(dict(config))


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(name: str, module: str, builder: str, *, tasks: tuple[str, ...] = LANGUAGE_TASKS) -> None:
    """Register `module.builder(config_dict)` as family `name`'s model for each of `tasks`."""
    known = _FAMILIES.get(name, ModelFamily(name))
    _FAMILIES[name] = ModelFamily(name, {**known.builders, **{task: (module, builder) for task in tasks}})


def get_family(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES))
        raise LlmctlError(f"unknown model family {name!r}; known families: {known}.") from None


def build_model(config: Mapping[str, Any]) -> Any:
    """Build an untrained model from a config dict that names its `family` (default gpt) and its `task`.

    Without a `task` key a family that builds one model builds it; the gpt family reads the task the way
    `llmctl.tasks.task_of_config` reads an older model dir's (a classifier when it has num_classes).
    """
    family = get_family(config.get("family", "gpt"))
    if isinstance(config.get("task"), str) or len(set(family.builders.values())) != 1:
        from llmctl.tasks import task_of_config

        return family.build(config, task_of_config(dict(config)).name)
    return family.build(config, next(iter(family.builders)))


register_family("gpt", "llmctl.models.gpt", "build_gpt")
register_family("gpt", "llmctl.models.classifiers", "build_gpt_classifier", tasks=("classification",))
for recurrent in RECURRENT_FAMILIES:
    register_family(recurrent, "llmctl.models.classifiers", "build_rnn_classifier", tasks=("classification",))
