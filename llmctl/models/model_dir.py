"""Write and read model dirs: config.json, model.safetensors, tokenizer.json, llmctl.json."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.artifacts import ModelDir, read_json_artifact, staged_dir, usual_mode, write_json_atomic
from llmctl.errors import LlmctlError


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module
    config: dict[str, Any]
    tokenizer: Any  # tokenizers.Tokenizer
    provenance: dict[str, Any]
    path: Path


# config.json entries that describe how to use the model rather than its weights (its task, the serve
# chat endpoint's template; a classifier's class names and how its texts are encoded): a model rebuilt
# from another, compressed for one, keeps them.
CARRIED_CONFIG_KEYS = ("task", "chat_template", "labels", "max_len", "pad_id")


def carried_config(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a model dir's config.json that a model derived from it keeps."""
    return {k: config[k] for k in CARRIED_CONFIG_KEYS if k in config}


def save_model_dir(
    model: Any,
    dest: Path,
    *,
    tokenizer_path: Path,
    provenance: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    task: str | None = None,
) -> None:
    """Write a complete model dir to `dest` atomically (a crash leaves the old one or none).

    `state_dict` overrides the model's own (the gathered one of a sharded model); `extra_config`
    adds entries to config.json (e.g. `carried_config` of the model it came from); a tied output
    head is stored once, as HF Llama does. A quantized model (`model.quantization` set) stores its
    integer weights and scales as they are and records the scheme in config.json. config.json records
    the model's `task`: `task`, else the one `extra_config` carries, else the one its shape implies.
    """
    from safetensors.torch import save_file

    from llmctl.tasks import task_of_config

    config = {**model.config.to_dict(), **(extra_config or {})}
    config["task"] = task or task_of_config(config).name
    quantization = getattr(model, "quantization", None)
    if quantization:
        config["quantization"] = quantization
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if config.get("tie_embeddings"):
        for name in [k for k in tensors if k.startswith("lm_head.")]:
            tensors.pop(name)
    dest = Path(dest)
    with staged_dir(dest, f"the model dir {dest}") as tmp:
        layout = ModelDir(tmp)
        write_json_atomic(layout.config, config)
        save_file(tensors, str(layout.weights), metadata={"format": "pt"})
        usual_mode(layout.weights)  # safetensors writes through a private (0600) temporary
        shutil.copyfile(tokenizer_path, layout.tokenizer)
        write_json_atomic(layout.provenance, provenance)


def copy_model_dir(src: Path, dest: Path) -> None:
    """Copy a whole model dir into place atomically."""
    dest = Path(dest)
    with staged_dir(dest, f"the model dir {dest}") as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)


def load_model_dir(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a model dir, refusing one whose parts disagree (tokenizer larger than the vocabulary, ...)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from tokenizers import Tokenizer

    from llmctl.config.loader import check_model_config
    from llmctl.models.registry import build_model

    md = ModelDir(Path(path))
    md.check()
    config = read_json_artifact(md.config, "model dir")
    config.pop("format_version", None)
    check_model_config(config, str(md.config))
    provenance = read_json_artifact(md.provenance, "model dir") if md.provenance.is_file() else {}
    try:
        tokenizer = Tokenizer.from_file(str(md.tokenizer))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise LlmctlError(f"{md.tokenizer}: not a readable tokenizer ({e}).") from None
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or tokenizer.get_vocab_size() > vocab:
        raise LlmctlError(
            f"{md.path}: tokenizer.json has {tokenizer.get_vocab_size()} tokens but config.json's vocab_size is "
            f"{vocab}; the tokenizer does not belong to this model (copy the dataset's tokenizer.json back, "
            "or retrain)."
        )
    if "quantization" in config:
        model = _load_quantized(md, config, device)
        return LoadedModel(model, config, tokenizer, provenance, md.path)
    try:
        model = build_model(config)
    except (TypeError, ValueError) as e:
        raise LlmctlError(f"{md.config}: cannot build the model from it ({e}).") from None
    try:
        missing, unexpected = load_model(model, str(md.weights), strict=False, device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LlmctlError(f"{md.weights}: cannot load the weights ({_first_problem(e)}).") from None
    if missing or unexpected:
        raise LlmctlError(
            f"{md.weights}: weights do not match config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})."
        )
    model.to(device).eval()
    return LoadedModel(model, config, tokenizer, provenance, md.path)


def _first_problem(e: Exception) -> str:
    """One line from a load error: torch lists every mismatched tensor on its own line."""
    lines = [line.strip().rstrip(".") for line in str(e).splitlines() if line.strip()]
    problems = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    if not problems:
        return lines[0] if lines else type(e).__name__
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more + "; config.json does not describe these weights"


def _load_quantized(md: ModelDir, config: dict[str, Any], device: str) -> Any:
    """A quantized model from its integer tensors; it runs on CPU only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmctl.models.quantized import SCHEMES, build_quantized_gpt, int4_kernel_problem

    quantization = config["quantization"]
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    if scheme not in SCHEMES:
        raise LlmctlError(
            f"{md.config}: quantization scheme {scheme!r} is not one this llmctl runs ({', '.join(SCHEMES)}); "
            "upgrade llmctl or quantize the float model again."
        )
    from llmctl.tasks import task_of_config

    classifier = task_of_config(config).name == "classification"
    if not classifier and config.get("family", "gpt") != "gpt":
        raise LlmctlError(f"{md.config}: quantized {config.get('family')!r} models are not supported; only gpt.")
    if classifier and scheme != "int8":
        raise LlmctlError(f"{md.config}: a classifier quantized with {scheme!r}; this llmctl runs int8 classifiers only.")
    if device != "cpu":
        raise LlmctlError(f"{md.path}: a quantized model ({scheme}) runs on CPU only, not {device}.")
    if scheme == "int4-weight" and int4_kernel_problem():
        raise LlmctlError(
            f"{md.path}: an int4-weight model cannot run here: {int4_kernel_problem()}; "
            "quantize the float model with int8-weight or int8 instead."
        )
    try:
        tensors = load_file(str(md.weights))
    except (SafetensorError, OSError) as e:
        raise LlmctlError(f"{md.weights}: cannot load the weights ({e}).") from None
    try:
        if classifier:
            from llmctl.models.quantized_classifiers import build_quantized_classifier

            return build_quantized_classifier(config, tensors)
        return build_quantized_gpt(config, tensors)
    except TypeError as e:
        raise LlmctlError(f"{md.config}: cannot build the model from it ({e}).") from None
    except ValueError as e:
        raise LlmctlError(
            f"{md.weights}: weights do not match config.json's quantization ({e}); the model dir is damaged "
            "or mixed from two models: write it again with `llmctl compress`."
        ) from None
