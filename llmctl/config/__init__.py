"""Recipes: YAML files validated once at load, with dotted command-line overrides."""

from llmctl.config.loader import apply_overrides, load_recipe, parse_recipe_text, recipe_to_yaml, validate_recipe
from llmctl.config.schema import DataConfig, ModelConfig, Recipe, RunConfig, SourceSpec, TrainConfig

__all__ = [
    "DataConfig",
    "ModelConfig",
    "Recipe",
    "RunConfig",
    "SourceSpec",
    "TrainConfig",
    "apply_overrides",
    "load_recipe",
    "parse_recipe_text",
    "recipe_to_yaml",
    "validate_recipe",
]
