"""Pruning and quantization of trained models: the engine behind `llmctl compress`.

Submodules import torch; this package module imports nothing heavy.
"""
