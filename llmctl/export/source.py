"""The model an export starts from: the fp32 CPU model that a model dir (float or quantized) stands for."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn


def float_model(loaded: Any, dequantize: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, dict[str, Any] | None]:
    """The fp32 CPU model to export, in eval mode, and the quantization it was dequantized from (None: it
    was float). `dequantize` is the task's: it turns the quantized model into the float one its integer
    weights stand for.

    ONNX Runtime's int8 is its own (--quantize int8), and an HF dir holds float weights, so a quantized
    model dir is exported as the float model its integer weights stand for, rounding kept.
    """
    model, quantization = loaded.model, loaded.config.get("quantization")
    if quantization:
        model = dequantize(model)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return model.eval(), quantization or None
