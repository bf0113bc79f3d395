"""Open whatever directory a user points at for inference: a model dir (plain, pruned or quantized)
or an export dir (ONNX Runtime). `eval`, `compress` and `serve` go through here.

A classifier, from either kind of dir, comes back as a model with `task == "classification"` called
`model(ids (B, T), lengths (B,)) -> logits` (`OnnxClassifier` for an export dir), its `config`
holding labels, max_len and pad_id; a language model as before (`OnnxCausalLM` for an export dir)."""

from __future__ import annotations

from pathlib import Path

from llmctl.artifacts import ExportDir, HFModelDir, ModelDir, read_json_artifact
from llmctl.errors import LlmctlError
from llmctl.models.model_dir import LoadedModel


def backend_of(path: Path) -> str:
    """"onnxruntime" for an (ONNX) export dir, "hf" for a Hugging Face dir (`export --format hf` writes one),
    "torch" for a model dir; refuses anything else, saying what it is."""
    path = Path(path)
    if not path.is_dir():
        raise LlmctlError(f"{path}: no such directory; expected a model dir (runs/<name>/model) or an export dir.")
    if HFModelDir(path).holds_hf_config():
        return "hf"
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


def require_model_dir(path: str | Path, command: str) -> None:
    """Refuse what `command` (compress, export) cannot start from, naming what the path is instead: missing,
    a file, a run dir, a dataset dir, an export dir, a Hugging Face dir, or a dir missing a model dir's files."""
    from llmctl.artifacts import DatasetDir

    path = Path(path)
    takes = f"{command} takes a model dir (runs/<name>/model, or a compressed one)"
    if not path.is_dir():
        raise LlmctlError(f"{path}: {'a file' if path.exists() else 'no such directory'}; {takes}.")
    if not ModelDir(path).config.is_file():
        if ModelDir(path / "model").config.is_file():
            raise LlmctlError(f"{path}: a run dir, not a model dir; use {path / 'model'}.")
        if DatasetDir(path).meta.is_file():
            raise LlmctlError(f"{path}: a dataset dir (what `llmctl prepare` writes), not a model dir; {takes}.")
    if ExportDir(path).is_export():
        raise LlmctlError(f"{path}: an export dir; {takes}, such as the one it was exported from.")
    if HFModelDir(path).holds_hf_config():
        raise LlmctlError(f"{path}: a Hugging Face dir; {takes} (train one from it with model.init_from: {path}).")
    ModelDir(path).check()


def load_for_inference(path: str | Path, *, onnx_file: str | None = None, spin_threads: bool = True) -> LoadedModel:
    """Load a model dir with torch, or an export dir with ONNX Runtime (CPU), as one LoadedModel
    (`spin_threads`: see `llmctl.models.ort_session.session_options`)."""
    path = Path(path)
    backend = backend_of(path)
    if backend == "hf":
        if onnx_file:
            raise LlmctlError(f"{path}: a Hugging Face dir has no ONNX graph; {onnx_file} applies to ONNX export dirs.")
        return load_hf_dir(path)
    if backend == "onnxruntime":
        return load_export_dir(path, file=onnx_file or "model.onnx", spin_threads=spin_threads)
    if onnx_file:
        raise LlmctlError(f"{path}: a model dir has no ONNX graph; {onnx_file} applies to export dirs.")
    from llmctl.models.model_dir import load_model_dir

    return load_model_dir(path)


def load_export_dir(path: str | Path, file: str = "model.onnx", spin_threads: bool = True) -> LoadedModel:
    """Open an export dir for inference: the graph `file` in ONNX Runtime (the model its task's export
    module opens it as: `OnnxCausalLM`, `OnnxClassifier`), its tokenizer, config and provenance;
    `spin_threads` as in `llmctl.models.ort_session.session_options`."""
    from tokenizers import Tokenizer

    from llmctl.models.ort_session import check_export_dir
    from llmctl.tasks import task_of

    layout = check_export_dir(Path(path), file)
    model = task_of(layout.path).export.open_onnx(layout.path, file, spin_threads=spin_threads)
    try:
        tokenizer = Tokenizer.from_file(str(layout.tokenizer))
    except Exception as e:  # tokenizers raises a bare Exception on a missing or bad file
        raise LlmctlError(f"{layout.tokenizer}: not a readable tokenizer ({e}).") from None
    provenance = read_json_artifact(layout.provenance, "export dir") if layout.provenance.is_file() else {}
    return LoadedModel(model, dict(model.config), tokenizer, provenance, layout.path)


def load_hf_dir(path: Path) -> LoadedModel:
    """A Llama/Mistral/Qwen2 Hugging Face dir as an llmctl `gpt` model (torch), its context its
    max_position_embeddings; refuses what the `gpt` family cannot reproduce, naming the fields."""
    from tokenizers import Tokenizer

    from llmctl.models.hf import gpt_fields_from_hf, read_hf_config
    from llmctl.models.registry import build_model
    from llmctl.models.init_from import load_weights_into

    layout = HFModelDir(Path(path))
    hf_config = read_hf_config(layout.path)
    context = int(hf_config.get("max_position_embeddings") or 2048)
    fields, _ = gpt_fields_from_hf(hf_config, str(layout.config), context)
    config = {"family": "gpt", **fields, "context_length": context}
    model = build_model(config)
    load_weights_into(model, layout.path)
    if not layout.tokenizer.is_file():
        raise LlmctlError(f"{layout.path}: no tokenizer.json; save the tokenizer with save_pretrained next to the model.")
    provenance = read_json_artifact(layout.provenance, "model dir") if layout.provenance.is_file() else {}
    return LoadedModel(model.eval(), config, Tokenizer.from_file(str(layout.tokenizer)), provenance, layout.path)
