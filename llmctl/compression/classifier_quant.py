"""Post-training int8 quantization of sequence classifiers (rnn, lstm, gru, gpt with num_classes).

`quantize_classifier` rounds every weight matrix of a float classifier to int8 rows (round to
nearest, no calibration) and rebuilds it through `build_quantized_classifier`, the very function
that loads a quantized classifier model dir, so what compress measures is what later commands run.
The layout and what computes in int8 per family are in `llmctl.models.quantized_classifiers`.
`dequantize_classifier` turns one back into the plain float classifier its integer weights stand
for (what the ONNX exporter traces).
"""

from __future__ import annotations


import torch
import torch.nn as nn

from llmctl.compression.quantization import int8_rows
from llmctl.errors import LlmctlError
from llmctl.models.quantized_classifiers import (
    SCALE_SUFFIX,
    SCHEME,
    build_quantized_classifier,
    dequantized_state_dict,
    quantization_entry,
)


def check_classifier_scheme(scheme: str) -> None:
    """Refuse a quantization scheme classifiers do not have, naming the one they do."""
    if scheme != SCHEME:
        raise LlmctlError(
            f"--quantize {scheme}: classifiers are quantized with int8 only (int8 weights per row; the "
            "recurrent layers of lstm/gru and every Linear compute in int8); int8-weight and int4-weight "
            "are weight-only schemes of gpt language models. Use --quantize int8."
        )


def int8_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's state dict with each weight matrix (every 2-D tensor: embeddings, recurrent
    and Linear weights) as int8 rows `X` plus float32 scales `X_scale`; biases and norms stay float32."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t = t.detach().float().cpu()
            if t.dim() == 2:
                out[name], out[name + SCALE_SUFFIX] = int8_rows(t)
            else:
                out[name] = t.contiguous()
    return out


def quantize_classifier(model: nn.Module, scheme: str = SCHEME) -> nn.Module:
    """A new int8 classifier from the float classifier `model` (left unchanged), in eval mode on CPU.

    `model.quantization` records the scheme for config.json, and its state dict is the stored layout.
    """
    from llmctl.models.classifiers import GPTClassifier, RNNClassifier

    check_classifier_scheme(scheme)
    if not isinstance(model, (GPTClassifier, RNNClassifier)):
        raise LlmctlError(f"quantize_classifier takes a classifier, not {type(model).__name__}.")
    if getattr(model, "quantization", None):
        raise LlmctlError(
            f"the model is already quantized ({model.quantization['scheme']}); quantize the float model it came from."
        )
    config = {**model.config.to_dict(), "quantization": quantization_entry()}
    return build_quantized_classifier(config, int8_tensors(model))


def dequantize_classifier(model: nn.Module) -> nn.Module:
    """A plain float32 classifier with `model`'s int8 weights dequantized (the same numbers, in float)."""
    from llmctl.models.registry import build_model

    if not getattr(model, "quantization", None):
        raise LlmctlError("dequantize_classifier needs a quantized classifier; this one is already plain float.")
    with torch.device("meta"):
        plain = build_model(model.config.to_dict())
    plain.load_state_dict(dequantized_state_dict(model.state_dict()), strict=True, assign=True)
    return plain.eval()
