"""The model zoo behind one registry: a family name maps to a config class and a model class."""

from llmctl.models.registry import ModelFamily, build_model, get_family, register_family

__all__ = ["ModelFamily", "build_model", "get_family", "register_family"]
