"""How a classifier is judged: the labelled val texts it is scored on, and its profile beside others.

`compress` compares a classifier before and after on these figures, and `eval --compare` any number of
classifier model and export dirs: accuracy and macro-F1 on the same val texts, size on disk, parameters,
and the latency of one forward pass over a batch of val texts, timed interleaved in this process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import LlmctlError
from llmctl.progress import Progress, silent_if_none

LATENCY_BATCH = 32  # texts per timed forward pass


@dataclass
class ClassifierProfile:
    name: str
    backend: str  # torch, torch-int8
    parameters: int | None
    nonzero_parameters: int | None
    size_bytes: int  # model.safetensors
    examples: int  # val texts scored (0: not measured)
    accuracy: float | None
    macro_f1: float | None
    forward_ms: float | None  # median wall time of one forward pass over `forward_batch` texts
    forward_batch: int | None
    forward_tokens: int | None  # the width of that batch (its longest text), tokens
    timing_spread: float | None = None  # slowest timing round over fastest (evaluation.speed.round_spread)
    timing_disturbed: bool | None = None  # beyond evaluation.speed.DISTURBED_SPREAD: another process took the CPU

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def val_inputs_of(loaded: Any, data: Path | None, max_tokens: int | None) -> tuple[Any, str | None]:
    """The labelled val texts a classifier is judged on (its own dataset's, or `data`'s), at most
    `max_tokens` real tokens of them, or None and why, when the model records no dataset that still exists."""
    from llmctl.tasks.classification.scoring import inputs_from_dataset
    from llmctl.evaluation.perplexity import dataset_of_model

    try:
        dataset = Path(data) if data else dataset_of_model(loaded.provenance, loaded.path).path
    except LlmctlError as e:
        return None, e.message
    inputs = inputs_from_dataset(loaded, dataset, "val")
    if max_tokens is not None:
        keep = max(1, int(np.searchsorted(np.cumsum(inputs.lengths), max_tokens, side="right")))
        inputs.ids, inputs.lengths, inputs.labels = inputs.ids[:keep], inputs.lengths[:keep], inputs.labels[:keep]
    return inputs, None


def profile_classifiers(loaded: list[Any], inputs: Any, names: list[str], *, speed: bool = True,
                        progress: Progress | None = None) -> list[ClassifierProfile]:
    """Score each model on the same val texts and time it on the same batch, timings interleaved."""
    from llmctl.tasks.classification.scoring import evaluate_classifier
    from llmctl.evaluation.profile import backend_name, stored_parameters, weights_files
    from llmctl.evaluation.speed import is_disturbed

    progress = silent_if_none(progress)
    ids, lengths = latency_batch(loaded[0].config, inputs)
    if speed:
        progress.stage(f"timing {len(loaded)} models, interleaved (forward at {ids.shape[0]} x {ids.shape[1]} tokens)")
    timings = classifier_latency_ms([m.model for m in loaded], ids, lengths) if speed else [(None, None)] * len(loaded)
    profiles = []
    for m, name, (ms, spread) in zip(loaded, names, timings):
        if inputs is not None:
            progress.stage(f"accuracy of {name} on {len(inputs.lengths):,} val texts")
        metrics = evaluate_classifier(m, inputs)[0] if inputs is not None else {}
        params, nonzero = stored_parameters(m)
        profiles.append(ClassifierProfile(
            name=name,
            backend=backend_name(m),
            parameters=params,
            nonzero_parameters=nonzero,
            size_bytes=sum(p.stat().st_size for p in weights_files(m)),
            examples=int(metrics.get("examples", 0)),
            accuracy=metrics.get("accuracy"),
            macro_f1=(metrics.get("macro") or {}).get("f1"),
            forward_ms=ms,
            forward_batch=int(ids.shape[0]) if ms is not None else None,
            forward_tokens=int(ids.shape[1]) if ms is not None else None,
            timing_spread=None if spread is None else round(spread, 3),
            timing_disturbed=is_disturbed(spread),
        ))
    return profiles


def latency_batch(config: dict[str, Any], inputs: Any) -> tuple[Any, Any]:
    """The batch latency is timed on: the first LATENCY_BATCH val texts cut to the longest, else
    seeded random full-length texts. Returns torch (ids (B, T), lengths (B,))."""
    import torch

    if inputs is not None and len(inputs.lengths):
        n = torch.as_tensor(np.asarray(inputs.lengths[:LATENCY_BATCH], dtype=np.int64))
        return torch.as_tensor(np.asarray(inputs.ids[:LATENCY_BATCH, : int(n.max())], dtype=np.int64)), n
    T = int(config.get("max_len") or min(int(config.get("context_length") or 64), 64))
    ids = torch.randint(0, int(config["vocab_size"]), (LATENCY_BATCH, T), generator=torch.Generator().manual_seed(0))
    return ids, torch.full((LATENCY_BATCH,), T, dtype=torch.int64)


def classifier_latency_ms(
    models: list[Any], ids: Any, lengths: Any, *, rounds: int = 3, reps: int = 5, warmup: int = 2
) -> list[tuple[float, float]]:
    """(median milliseconds of `model(ids, lengths)`, spread of its per-round medians) per model, timed round by
    round so a busy machine slows all alike."""
    import torch

    from llmctl.evaluation.speed import round_spread

    times: list[list[list[float]]] = [[] for _ in models]  # model -> round -> seconds of each rep
    with torch.inference_mode():
        for model in models:
            for _ in range(warmup):
                model(ids, lengths)
        for _ in range(rounds):
            for i, model in enumerate(models):
                reps_s = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    model(ids, lengths)
                    reps_s.append(time.perf_counter() - t0)
                times[i].append(reps_s)
    return [(1000 * statistics.median([t for r in per_round for t in r]),
             round_spread([statistics.median(r) for r in per_round])) for per_round in times]
