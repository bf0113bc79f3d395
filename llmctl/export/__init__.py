"""Export a model dir to other runtimes: ONNX (one graph, optionally int8) or a Hugging Face dir, with parity checks.

The neutral parts live here (tracing and opset handling, the export skeleton, int8 candidates, parity
bookkeeping, the HF writer); what a task's graph is and how it is judged lives in its
`llmctl/tasks/<task>/export.py`.
"""
