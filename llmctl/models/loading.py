"""Open whatever directory a user points at for inference: a model dir (plain, pruned or quantized)
or an export dir (ONNX Runtime). `eval`, `compress` and `serve` go through here.

A classifier, from either kind of dir, comes back as a model with `task == "classification"` called
`model(ids (B, T), lengths (B,)) -> logits` (`OnnxClassifier` for an export dir), its `config`
holding labels, max_len and pad_id; a language model as before (`OnnxCausalLM` for an export dir)."""

from __future__ import annotations

from pathlib import Path

from llmctl.artifacts import ExportDir, ModelDir
from llmctl.errors import LlmctlError
from llmctl.models.model_dir import LoadedModel


def backend_of(path: Path) -> str:
    """"onnxruntime" for an export dir, "torch" for a model dir; refuses anything else, saying what it is."""
    path = Path(path)
    if not path.is_dir():
        raise LlmctlError(f"{path}: no such directory; expected a model dir (runs/<name>/model) or an export dir.")
    if ExportDir(path).is_export():
        return "onnxruntime"
    if ModelDir(path).config.is_file():
        return "torch"
    if ModelDir(path / "model").config.is_file():
        raise LlmctlError(f"{path}: a run dir, not a model dir; use {path / 'model'}.")
    raise LlmctlError(
        f"{path}: neither a model dir (config.json, model.safetensors, tokenizer.json, as `llmctl train` or "
        "`llmctl compress` write) nor an export dir (export.json and model.onnx, as `llmctl export` writes)."
    )


def load_for_inference(path: str | Path, *, onnx_file: str | None = None) -> LoadedModel:
    """Load a model dir with torch, or an export dir with ONNX Runtime (CPU), as one LoadedModel."""
    path = Path(path)
    if backend_of(path) == "onnxruntime":
        from llmctl.models.onnx_model import load_export_dir

        return load_export_dir(path, file=onnx_file or "model.onnx")
    if onnx_file:
        raise LlmctlError(f"{path}: a model dir has no ONNX graph; {onnx_file} applies to export dirs.")
    from llmctl.models.model_dir import load_model_dir

    return load_model_dir(path)
