"""Hyperparameter search: Optuna studies built from a recipe's `tune` section."""
