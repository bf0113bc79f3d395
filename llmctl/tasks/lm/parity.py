"""Parity of an exported decoder graph with the `gpt` model it came from.

Both backends run the same steps in lockstep: a batch of prompts of different lengths, left-padded,
then cached decode steps (P > 0, T = 1), each backend on its own cache; and one prompt of a single
token (the sizes torch.export specialises: B = 1, P = 0, T = 1), then a chunk (P > 0, T > 1), then
decode. Every output is compared, and the greedy token each backend would pick is compared at every
step. The next input is always PyTorch's pick, so the two keep seeing the same tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmctl.export.verify import ParityResult, Tally, parity_failure
from llmctl.progress import OnProgress


def verify_parity(
    torch_model: Any,
    onnx_model: Any,
    *,
    atol: float = 1e-4,
    rtol: float | None = None,
    tokens: np.ndarray | None = None,
    decode_steps: int = 4,
    on_progress: OnProgress | None = None,
) -> ParityResult:
    """Run both models on the same left-padded batch and cached steps; fail on a difference above atol (+ rtol·|torch|).

    The prompts are cut from `tokens` (token ids) when given, else random (`parity_prompts`); both
    models take the `gpt` call signature.
    Greedy picks must agree at every step. The failure names the first tensor that broke the
    tolerance, in the order the model computes them (step, then layer, then logits), or the
    step ONNX Runtime could not run at all.
    """
    context = torch_model.context_length
    steps = max(1, min(decode_steps, context // 4))
    prompts = parity_prompts(torch_model.config.vocab_size, context, steps, tokens)
    logits_row, keys_row, values_row = Tally("logits"), Tally("present.*.key"), Tally("present.*.value")
    failures: list[str] = []
    greedy: dict[str, Any] = {"compared": 0, "identical": True, "first_difference": None}
    cases = [("left-padded batch", _batch_feeds(prompts, steps)), ("single token", _single_feeds(prompts[0], steps, context))]
    total, ran = sum(len(feeds) for _, feeds in cases), 0

    def check(tally: Tally, name: str, where: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        problem = tally.add(name, where, got, ref, atol, rtol)
        if problem:
            failures.append(problem)

    def run(case: str, feeds: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> None:
        """`feeds`: per step (input_ids, attention_mask, position_ids); input_ids None: the last greedy picks."""
        cache_t = cache_o = picks = None
        for step, (ids, mask, pos) in enumerate(feeds):
            ids = picks[:, None] if ids is None else ids  # (B, T)
            B, T = ids.shape
            P = cache_t[0][0].shape[2] if cache_t else 0
            where = f"{case} step {step} (B={B}, P={P}, T={T})"
            with torch.no_grad():
                logits_t, cache_t = torch_model(ids, cache_t, pos, mask, use_cache=True)
            try:
                logits_o, cache_o = onnx_model(ids, cache_o, pos, mask, use_cache=True)
            except Exception as e:  # onnxruntime's own error types: a graph that cannot take these sizes
                failures.append(f"ONNX Runtime cannot run {where} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
                return
            nonlocal ran
            ran += 1
            if on_progress is not None:
                on_progress(ran, total)
            for i, ((k_t, v_t), (k_o, v_o)) in enumerate(zip(cache_t, cache_o)):
                check(keys_row, f"present.{i}.key", where, k_o, k_t)
                check(values_row, f"present.{i}.value", where, v_o, v_t)
            check(logits_row, "logits", where, logits_o, logits_t)
            picks, picks_o = logits_t[:, -1].argmax(-1), logits_o[:, -1].argmax(-1)  # (B,)
            greedy["compared"] += B
            differ = (picks != picks_o).nonzero().flatten().tolist()
            if differ and greedy["identical"]:
                b = differ[0]
                greedy["identical"] = False
                greedy["first_difference"] = (
                    f"{where}, row {b}: PyTorch picks token {int(picks[b])}, ONNX Runtime {int(picks_o[b])}"
                )

    for case, feeds in cases:
        run(case, feeds)

    failure = parity_failure(failures, atol, rtol,
                             None if greedy["identical"] else f"greedy generation differs: {greedy['first_difference']}")
    figures = {
        "atol": atol,
        "rtol": rtol,
        "prompt_lengths": [len(p) for p in prompts],
        "decode_steps": steps,
        "greedy": greedy,
    }
    return ParityResult(failure is None, failure, [logits_row.row, keys_row.row, values_row.row], figures)


def parity_prompts(
    vocab_size: int, context_length: int, decode_steps: int, tokens: np.ndarray | None = None
) -> list[list[int]]:
    """Three prompts of different lengths that leave room for the decode steps.

    Cut from `tokens` when given (real text gives realistic logits), else seeded random ids.
    """
    room = max(2, context_length - decode_steps - 1)
    lengths = sorted({min(room, n) for n in (12, 5, 2)}, reverse=True)
    if tokens is not None and len(tokens) >= sum(lengths):
        starts = np.cumsum([0, *lengths[:-1]])
        return [[int(t) for t in tokens[s : s + n]] for s, n in zip(starts, lengths)]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _batch_feeds(prompts: list[list[int]], steps: int) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Left-padded prefill of `prompts`, then `steps` decode steps on the greedy picks."""
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.int64)
    mask = torch.zeros(B, L, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): real tokens count from 0
    feeds: list[tuple[Any, torch.Tensor, torch.Tensor]] = [(ids, mask, pos)]
    for _ in range(steps):
        mask = torch.cat((mask, torch.ones(B, 1, dtype=torch.int64)), dim=1)  # (B, P+1)
        pos = pos[:, -1:] + 1  # (B, 1)
        feeds.append((None, mask, pos))
    return feeds


def _single_feeds(prompt: list[int], steps: int, context: int) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """One token alone (B = 1, P = 0, T = 1), then a chunk of up to 3 tokens with a past, then decode steps."""
    chunk = prompt[1:4] if len(prompt) > 1 else [0]
    chunk = chunk[: max(1, context - steps - 2)]
    feeds: list[tuple[Any, torch.Tensor, torch.Tensor]] = [
        (torch.tensor([prompt[:1]]), torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64))
    ]
    n = 1 + len(chunk)
    feeds.append((torch.tensor([chunk]), torch.ones(1, n, dtype=torch.int64), torch.arange(1, n)[None]))
    for _ in range(steps):
        n += 1
        feeds.append((None, torch.ones(1, n, dtype=torch.int64), torch.tensor([[n - 1]])))
    return feeds
