"""Families are looked up by name, so a new one plugs in without touching the trainer.

A family registers a builder that takes the recipe's model section (as a dict,
with vocab_size filled in) and returns an `nn.Module`. A language model's forward
takes token ids (B, T) and returns logits (B, T, V). A classifier (class attribute
`task == "classification"`; its config dict also holds num_classes and pad_id)
takes right-padded token ids (B, T) and lengths (B,) and returns logits (B, 1) for
two classes, else (B, num_classes). The family module is imported only when a
model is built, so importing the registry stays free of torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from llmctl.errors import LlmctlError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    module: str
    builder: str

    def build(self, config: dict[str, Any]) -> Any:
        build: Callable[[dict[str, Any]], Any] = getattr(importlib.import_module(self.module), self.builder)
        return build(config)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(name: str, module: str, builder: str) -> None:
    """Register family `name` built by `module.builder(config_dict)`."""
    _FAMILIES[name] = ModelFamily(name, module, builder)


def get_family(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES))
        raise LlmctlError(f"unknown model family {name!r}; known families: {known}.") from None


def build_model(config: dict[str, Any]) -> Any:
    """Build an untrained model from a model config dict that names its `family`."""
    return get_family(config.get("family", "gpt")).build(config)


register_family("gpt", "llmctl.models.gpt", "build_gpt")  # a classifier when the config has num_classes
register_family("rnn", "llmctl.models.classifiers", "build_rnn_classifier")
register_family("lstm", "llmctl.models.classifiers", "build_rnn_classifier")
register_family("gru", "llmctl.models.classifiers", "build_rnn_classifier")
