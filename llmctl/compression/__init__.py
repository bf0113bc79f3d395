"""Pruning and quantization of trained models: the engine behind `llmctl compress`.

The neutral parts live here (pruning, the quantized layouts' writers, saving a compressed dir, the report's
cells); how a task compresses and is judged lives in its `llmctl/tasks/<task>/compression.py`.
Submodules import torch; this package module imports nothing heavy.
"""
