"""What a model costs to run: size on disk, parameters, forward latency and generation speed.

The same functions measure a torch model, a quantized one and an ONNX Runtime one (anything with
the `gpt` call signature), so `compress` and `eval --compare` put like against like.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmctl.progress import OnProgress


# A model's slowest timing round over its fastest. Rounds of one model on a quiet machine agree within a few
# percent; beyond this ratio another process took the CPU during some of them, and the figure is marked.
DISTURBED_SPREAD = 1.5


def round_spread(per_round: list[float]) -> float:
    """Largest over smallest of one model's per-round figures (1.0: the rounds agree)."""
    return max(per_round) / min(per_round) if per_round and min(per_round) > 0 else 1.0


def is_disturbed(spread: float | None) -> bool | None:
    return None if spread is None else spread > DISTURBED_SPREAD


@dataclass
class SpeedResult:
    forward_ms: float  # median wall time of one forward pass, batch 1 x `forward_tokens`
    forward_tokens: int
    generate_tokens_per_s: float  # greedy, KV-cached, after a prompt of `prompt_tokens`
    prompt_tokens: int
    new_tokens: int
    spread: float = 1.0  # the wider of round_spread over the forward and generation rounds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dir_size_bytes(path: Path) -> int:
    """Bytes of the files under `path` that hold the model (weights, graphs, tokenizer, config)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def forward_latency_ms(model: Any, tokens: int, *, reps: int = 10, warmup: int = 2, vocab_size: int = 2) -> float:
    """Median milliseconds of a forward pass over one sequence of `tokens` ids."""
    import torch

    ids = torch.randint(0, max(vocab_size, 2), (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            model(ids)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def generation_tokens_per_s(model: Any, prompt_tokens: int, new_tokens: int, *, vocab_size: int = 2, reps: int = 3) -> float:
    """New tokens per second of greedy KV-cached generation (prompt encoding included), best of `reps`."""
    import torch

    from llmctl.models.generation import SamplingParams, generate

    prompt = torch.randint(0, max(vocab_size, 2), (prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    best = float("inf")
    with torch.inference_mode():
        generate(model, prompt[:8], SamplingParams(max_new_tokens=2, temperature=0.0))
        for _ in range(reps):
            t0 = time.perf_counter()
            out = generate(model, prompt, params)
            best = min(best, (time.perf_counter() - t0) / max(len(out), 1))
    return 1.0 / best


def measure_speeds(
    models: list[Any], context_length: int, vocab_size: int, *, new_tokens: int = 32, rounds: int = 3,
    on_progress: OnProgress | None = None,
) -> list[SpeedResult]:
    """Time several models the same way, interleaved round by round, so a busy machine slows all alike.

    Forward latency is at batch 1 over the full context; generation follows a half-context prompt.
    Each figure is the median (forward) or best (generation) over the rounds; `spread` says how far a
    model's rounds disagree (see DISTURBED_SPREAD).
    """
    prompt = max(1, min(context_length // 2, context_length - new_tokens))
    forward: list[list[float]] = [[] for _ in models]
    tps: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            forward[i].append(forward_latency_ms(model, context_length, reps=5, vocab_size=vocab_size))
            tps[i].append(generation_tokens_per_s(model, prompt, new_tokens, vocab_size=vocab_size, reps=1))
            if on_progress is not None:
                on_progress(sum(map(len, tps)), rounds * len(models))
    return [
        SpeedResult(statistics.median(f), context_length, max(t), prompt, new_tokens, max(round_spread(f), round_spread(t)))
        for f, t in zip(forward, tps)
    ]
