"""`model.init_from`: start training from existing weights instead of a random init.

The weights come from an llmctl model dir, or from a Hugging Face checkpoint of a Llama, Mistral or
Qwen2 model (a local dir or `hf:ORG/NAME` in the local cache), whose parameter names are the `gpt`
family's own (llmctl/models/hf.py; the recipe loader has already taken the model's shape from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.artifacts import ModelDir, read_json_artifact
from llmctl.errors import LlmctlError


def load_weights_into(model: Any, path: Path | str) -> None:
    """Copy a model dir's or HF checkpoint's weights into `model` (a recipe's `model.init_from`), refusing a shape mismatch.

    A classifier may start from a language model of the same shape (its `gpt` backbone) or from another
    classifier; its output head is kept as initialised unless the source has one of the same shape.
    """
    from llmctl.models.hf import is_hf_checkpoint

    source = str(path)
    own = model.state_dict()
    if is_hf_checkpoint(source):
        tensors, where = _hf_tensors(source, own), source
    else:
        tensors, where = _model_dir_tensors(Path(path)), str(ModelDir(Path(path)).path)
    if getattr(model.config, "tie_embeddings", False) and "lm_head.weight" in own:
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    # A classifier started from a language model (or from a classifier with other classes) keeps its
    # freshly initialised head: the backbone's weights are what carries over.
    fresh_head = [k for k in own if k.split(".")[0] in ("score", "head")] if getattr(model, "task", None) == "classification" else []
    if fresh_head and not all(k in tensors and tensors[k].shape == own[k].shape for k in fresh_head):
        tensors = {k: v for k, v in tensors.items() if k not in fresh_head}
        for k in fresh_head:
            tensors[k] = own[k]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items() if k in own and v is not None and v.shape != own[k].shape]
    missing = sorted(set(own) - set(tensors))
    if wrong or missing:
        detail = f"shapes differ: {'; '.join(wrong[:3])}" if wrong else f"missing {missing[:3]}"
        raise LlmctlError(
            f"model.init_from: {where} does not fit this recipe's model section ({detail}); "
            f"make the model section match its config.json."
        )
    model.load_state_dict({k: tensors[k] for k in own})


def _model_dir_tensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    md = ModelDir(path)
    md.check()
    config = read_json_artifact(md.config, "model dir")
    if config.get("quantization"):
        raise LlmctlError(f"model.init_from: {md.path} is quantized ({config['quantization'].get('scheme')}); start from a float model dir.")
    try:
        return load_file(str(md.weights))
    except (SafetensorError, OSError) as e:
        raise LlmctlError(f"model.init_from: {md.weights}: cannot read the weights ({e}).") from None


def _hf_tensors(source: str, own: dict[str, Any]) -> dict[str, Any]:
    """The decoder's tensors (and output head) from an HF checkpoint, each checked against `own`'s shape."""
    from llmctl.models.hf import check_hf_weights, load_hf_tensors, resolve_hf_dir

    path = resolve_hf_dir(source)
    expected = {k: tuple(v.shape) for k, v in own.items() if k.startswith("model.") or k == "lm_head.weight"}
    tied = "lm_head.weight" not in expected or own["lm_head.weight"].data_ptr() == own["model.embed_tokens.weight"].data_ptr()
    try:
        index = check_hf_weights(path, expected, optional=frozenset({"lm_head.weight"}) if tied else frozenset(),
                                 ignored=frozenset({"lm_head.weight"}))
    except LlmctlError as e:
        raise LlmctlError(f"model.init_from: {e.message}") from None
    return load_hf_tensors(index, [k for k in index if k in expected])
