"""Sampling from a causal LM with a KV cache: temperature, top-k, top-p, stop tokens, seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: list[int] = field(default_factory=list)
    seed: int | None = None


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id for each row of `logits` (B, V) -> (B,)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_device(model: object) -> torch.device:
    """Where a model's inputs go: its `device` attribute (ONNX Runtime wrappers) or its first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device  # type: ignore[attr-defined]


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """Continue `prompt_ids`; returns only the new token ids (the stop token excluded).

    The cache is filled once by the prompt and then grows by one token per step.
    When it reaches the model's context length, the last half of the context is
    re-encoded from position 0, as the model never saw positions beyond it.
    """
    model.eval()
    device = model_device(model)
    context = model.context_length
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    tokens = list(prompt_ids)[-context:] or [params.stop_ids[0] if params.stop_ids else 0]
    new: list[int] = []
    logits, cache = model(torch.tensor([tokens], device=device), use_cache=True)
    for _ in range(params.max_new_tokens):
        next_id = int(sample_next(logits[:, -1, :], params, generator)[0])
        if next_id in params.stop_ids:
            break
        new.append(next_id)
        tokens.append(next_id)
        if cache[0][0].shape[2] >= context:
            tokens = tokens[-(context // 2):]
            logits, cache = model(torch.tensor([tokens], device=device), use_cache=True)
        else:
            logits, cache = model(torch.tensor([[next_id]], device=device), past_key_values=cache, use_cache=True)
    return new
