"""Post-training quantization of `gpt` models: float weights -> the runtime modules of `llmctl.models.quantized`.

`quantize_model` rounds every decoder Linear layer, the token embedding and the output head (round
to nearest, no calibration) and swaps in the modules that run them; `save_model_dir` then stores
integer tensors plus scales. `dequantize` turns a quantized model back into a plain float `GPT` (what
the ONNX exporter needs), with the rounding kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmctl.errors import LlmctlError
from llmctl.models.gpt import GPT
from llmctl.progress import OnProgress
from llmctl.models.quantized import (
    QUANTIZED_MODULES,
    SCHEMES,
    Int4WeightOnlyLinear,
    Int8Embedding,
    decoder_linear_names,
    int4_kernel_problem,
    int8_linear_type,
    pack_int4,
)

INT4_GROUP_SIZE = 32  # inputs sharing one scale and offset; 32 costs 1 bit per weight for them


def quantize_model(model: GPT, scheme: str, on_progress: OnProgress | None = None) -> GPT:
    """Quantize `model` in place under `scheme` ("int8", "int8-weight" or "int4-weight") and return it.

    The model is put in eval mode and runs on CPU only; `model.quantization` records the scheme for
    config.json. `on_progress(done, total)` counts the tensors quantized.
    """
    if scheme not in SCHEMES:
        raise LlmctlError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    _check_float_gpt(model, "quantize")
    if scheme == "int4-weight" and int4_kernel_problem():
        raise LlmctlError(
            f"cannot quantize to int4-weight: {int4_kernel_problem()}. Use int8-weight or int8, "
            "or a torch build whose CPU kernels include it."
        )
    if next(model.parameters()).device.type != "cpu":
        raise LlmctlError("quantized models run on CPU only; move the model to CPU before quantizing it.")
    names = decoder_linear_names(model)
    total = len(names) + 2  # the layers, then the embedding and the output head
    with torch.no_grad():
        for done, name in enumerate(names, 1):
            weight = model.get_submodule(name).weight.float()
            if scheme == "int4-weight":
                packed, scale, zero = int4_groups(weight, INT4_GROUP_SIZE)
                module: nn.Module = Int4WeightOnlyLinear(packed, scale, zero, weight.shape[1], INT4_GROUP_SIZE)
            else:
                module = int8_linear_type(scheme)(*int8_rows(weight))
            model.set_submodule(name, module)
            if on_progress is not None:
                on_progress(done, total)
        head_weight = model.lm_head.weight.float()
        embed = Int8Embedding(*int8_rows(model.model.embed_tokens.weight.float()))
        model.model.embed_tokens = embed
        if model.config.tie_embeddings:
            model.lm_head = int8_linear_type(scheme)(embed.weight, embed.weight_scale)
        else:
            model.lm_head = int8_linear_type(scheme)(*int8_rows(head_weight))
        if on_progress is not None:
            on_progress(total, total)
    model.quantization = {"scheme": scheme, **({"group_size": INT4_GROUP_SIZE} if scheme == "int4-weight" else {})}
    model.batch_invariant = scheme != "int8"  # as build_quantized_gpt marks it
    return model.eval()


def dequantize(model: GPT) -> GPT:
    """A plain float32 `GPT` with `model`'s quantized weights dequantized (the same numbers, in float)."""
    if not getattr(model, "quantization", None):
        raise LlmctlError("dequantize needs a quantized model; this one is already plain float.")
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_MODULES):
            state[f"{name}.weight"] = module.dequantized_weight()
    for name, p in model.named_parameters():
        state[name] = p.detach().float()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    with torch.device("meta"):
        plain = GPT(model.config)
    plain.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain.eval()


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: float (N, K) -> (int8 q (N, K), float32 scale (N,)), weight ≈ q * scale."""
    amax = weight.abs().amax(dim=1)  # (N,)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row keeps q = 0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` inputs: float (N, K) -> packed uint8 (N, Kp/2),
    bfloat16 scale and zero (N, Kp/gs), weight ≈ (q - 8) * scale + zero, K zero-padded to Kp.
    """
    N, K = weight.shape
    Kp = math.ceil(K / group_size) * group_size
    groups = F.pad(weight, (0, Kp - K)).view(N, -1, group_size)  # (N, G, gs)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, G)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    # Round against the bfloat16 scale and zero actually stored, so they are exact for what was kept.
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return pack_int4(q.view(N, Kp)), scale, zero


def _check_float_gpt(model: nn.Module, verb: str) -> None:
    if not isinstance(model, GPT):
        raise LlmctlError(f"can only {verb} `gpt` models, not {type(model).__name__}.")
    if getattr(model, "quantization", None):
        raise LlmctlError(
            f"the model is already quantized ({model.quantization['scheme']}); {verb} the float model it came from."
        )
