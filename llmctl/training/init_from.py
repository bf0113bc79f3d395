"""`model.init_from`: start training from an existing model dir's weights instead of a random init."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.artifacts import ModelDir, read_json_artifact
from llmctl.errors import LlmctlError


def load_weights_into(model: Any, path: Path) -> None:
    """Copy a model dir's weights into `model` (a recipe's `model.init_from`), refusing a shape mismatch.

    A classifier may start from a language model of the same shape (its `gpt` backbone) or from another
    classifier; its output head is kept as initialised unless the source has one of the same shape.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    md = ModelDir(Path(path))
    md.check()
    config = read_json_artifact(md.config, "model dir")
    if config.get("quantization"):
        raise LlmctlError(f"model.init_from: {md.path} is quantized ({config['quantization'].get('scheme')}); start from a float model dir.")
    try:
        tensors = load_file(str(md.weights))
    except (SafetensorError, OSError) as e:
        raise LlmctlError(f"model.init_from: {md.weights}: cannot read the weights ({e}).") from None
    own = model.state_dict()
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
            f"model.init_from: {md.path} does not fit this recipe's model section ({detail}); "
            f"make the model section match its config.json."
        )
    model.load_state_dict({k: tensors[k] for k in own})

