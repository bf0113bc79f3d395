"""The model zoo behind one registry: a family name and a task map to the builder of a model."""

from llmctl.models.registry import ModelFamily, build_model, get_family, register_family

__all__ = ["ModelFamily", "build_model", "get_family", "register_family"]
