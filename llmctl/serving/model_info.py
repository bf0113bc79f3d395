"""The model `llmctl serve` is given, read once before listening (config.json and tokenizer.json parsed
here, without torch, and handed on to the routes and the runner), then loaded in the loader thread.

A model dir is run by torch, an export dir by ONNX Runtime, and a Hugging Face dir (what `export
--format hf` writes) as `llmctl eval` scores one: the `gpt` model its config describes, by torch. The
task (`llmctl.tasks`) comes from config.json; its serving module says what else the routes need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from llmctl.artifacts import ExportDir, HFModelDir, ModelDir, read_json_artifact
from llmctl.errors import LlmctlError
from llmctl.tasks import Task, task_of, task_of_config

DTYPES = ("fp32", "bf16")
GRAPHS = ("fp32", "int8")  # an export dir's model.onnx, or model.int8.onnx (`export --quantize int8`)
HF_DEFAULT_CONTEXT = 2048  # tokens, when an HF config.json names no max_position_embeddings (as loading reads it)


class ServedShape(NamedTuple):
    """What a task's serving module reads from config.json: the tokens a request may hold (a classifier:
    the tokens it reads per text), the vocabulary, the end-of-text id (a classifier: its pad id), and
    the task's own contract for its routes (a ClassifierSpec; None for a language model)."""

    context_length: int
    vocab_size: int
    eot_id: int
    spec: Any = None


@dataclass
class ModelInfo:
    """What can be known of a model, export or HF dir without loading its weights (cheap: no torch)."""

    path: Path
    backend: str  # torch | onnxruntime | hf (run by torch)
    task: Task
    config: dict[str, Any]  # an HF dir's: the fields serve reads, in llmctl's names
    config_path: Path
    tokenizer: Any  # tokenizers.Tokenizer
    context_length: int  # tokens; a classifier's max_len (tokens it reads per text)
    vocab_size: int
    eot_id: int  # a classifier's pad id
    quantization: str | None
    spec: Any = None  # the task's contract for its routes: a ClassifierSpec; None for a language model
    graph: Path | None = None  # the ONNX graph ONNX Runtime runs (an export dir), else None


def inspect_model(path: Path, dtype: str, graph: str | None = None) -> ModelInfo:
    """Check that `path` is a servable model, export or HF dir (and `graph` one of its graphs) and read its
    config and tokenizer; refuses anything else with an LlmctlError naming what to change."""
    from tokenizers import Tokenizer

    from llmctl.models.loading import backend_of

    path = Path(path)
    _refuse_bad_options(path, dtype, graph)
    backend = backend_of(path)
    config_path, tokenizer_path, onnx, what = _layout(path, backend, graph)
    config = read_json_artifact(config_path, what)
    if backend == "hf":
        config = _hf_fields(path, config)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse problem
        raise LlmctlError(f"{tokenizer_path}: not a readable tokenizer.json ({e}).") from None
    task = task_of_config(config)
    if backend == "onnxruntime" and task_of(path).name != task.name:
        raise LlmctlError(f"{config_path} describes a {task.name} model but {ExportDir(path).manifest.name} a "
                          f"{task_of(path).name} one; the export dir is damaged: write it again with `llmctl export`.")
    shape = task.serving.describe(config, tokenizer, str(config_path), what)
    quantization = config.get("quantization")
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    if dtype == "bf16" and backend == "onnxruntime":
        raise LlmctlError(f"--dtype bf16: {path} is an export dir, run by ONNX Runtime in fp32; drop --dtype "
                          "or serve the model dir it was exported from.")
    if dtype == "bf16" and scheme:
        raise LlmctlError(f"--dtype bf16: {path} is quantized ({scheme}) and runs in its own precision; drop --dtype.")
    return ModelInfo(path, backend, task, config, config_path, tokenizer, shape.context_length, shape.vocab_size,
                     shape.eot_id, scheme, shape.spec, onnx)


def _refuse_bad_options(path: Path, dtype: str, graph: str | None) -> None:
    if dtype not in DTYPES:
        raise LlmctlError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
    if graph is not None and graph not in GRAPHS:
        raise LlmctlError(f"--graph {graph!r}: expected one of {', '.join(GRAPHS)}.")
    if path.is_file() and path.suffix == ".onnx" and ExportDir(path.parent).is_export():
        flag = " --graph int8" if path.name == ExportDir(path.parent).onnx_int8.name else ""
        raise LlmctlError(f"{path}: a graph file; serve its export dir: `llmctl serve {path.parent}{flag}`.")


def _layout(path: Path, backend: str, graph: str | None) -> tuple[Path, Path, Path | None, str]:
    """(config.json, tokenizer.json, the ONNX graph or None, what the dir is called), refusing missing files."""
    if backend == "onnxruntime":
        export = ExportDir(path)
        onnx = export.onnx_int8 if graph == "int8" else export.onnx
        if graph == "int8" and not onnx.is_file():
            raise LlmctlError(f"--graph int8: {path} has no {onnx.name}; write it with `llmctl export ... --quantize "
                              "int8`, or drop --graph to serve model.onnx.")
        for needed in (onnx, export.tokenizer, export.config):
            if not needed.is_file():
                raise LlmctlError(f"{path}: an export dir without {needed.name}; write it again with `llmctl export`.")
        return export.config, export.tokenizer, onnx, "export dir"
    if graph is not None:
        kind = "a Hugging Face dir (torch)" if backend == "hf" else "a model dir (torch)"
        raise LlmctlError(f"--graph {graph}: picks the graph of an ONNX export dir; {path} is {kind}. "
                          "Drop --graph, or serve the export dir.")
    if backend == "hf":
        layout = HFModelDir(path)
        if not layout.tokenizer.is_file():
            raise LlmctlError(f"{path}: no tokenizer.json; save the tokenizer with save_pretrained next to the model.")
        return layout.config, layout.tokenizer, None, "Hugging Face dir"
    layout = ModelDir(path)
    layout.check()
    return layout.config, layout.tokenizer, None, "model dir"


def _hf_fields(path: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """An HF config.json as the fields serve reads, in llmctl's names: a language model of the `gpt` family
    with the context loading gives it, and the chat template the checkpoint ships (tokenizer_config.json)."""
    from llmctl.models.hf import hf_chat_template

    return {"family": "gpt", "task": "lm", "vocab_size": hf.get("vocab_size"),
            "context_length": int(hf.get("max_position_embeddings") or HF_DEFAULT_CONTEXT),
            "chat_template": hf_chat_template(path)}


def load_served_model(info: ModelInfo, dtype: str = "fp32") -> Any:
    """The model `info` describes, loaded as the server runs it: in `dtype` (torch), or on the graph
    `--graph` chose, with ONNX Runtime's threads never spinning. Spinning threads starve the HTTP
    thread and the engine's own Python between steps: 16 clients got fewer tokens/s than one."""
    from llmctl.models.loading import load_for_inference

    loaded = load_for_inference(info.path, onnx_file=info.graph.name if info.graph is not None else None,
                                spin_threads=False)
    model = loaded.model
    if dtype == "bf16":
        import torch

        model = model.to(torch.bfloat16)
    return model


def weight_files(info: ModelInfo) -> list[Path]:
    """The files loading reads its weights from: an export dir's graph (+ data), else *.safetensors."""
    if info.graph is not None:
        graph = info.graph
        return [f for f in (graph, graph.with_name(graph.name + ".data")) if f.is_file()]
    return sorted(Path(info.path).glob("*.safetensors"))


def backend_label(info: ModelInfo, dtype: str) -> str:
    """How the model runs, as /health and the startup lines say it."""
    if info.backend == "onnxruntime":
        return "onnxruntime int8" if info.graph == ExportDir(info.path).onnx_int8 else "onnxruntime"
    return f"torch-{info.quantization}" if info.quantization else f"torch {dtype}"
