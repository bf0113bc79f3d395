"""One model's figures side by side with another's: perplexity, size, speed, parameters.

`compress` profiles before and after, `eval --compare` profiles each directory it is given; both
score the same val tokens and time the same shapes in the same process, so the figures compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.evaluation.speed import SpeedResult, is_disturbed
from llmctl.progress import OnProgress, Progress, silent_if_none


@dataclass
class ModelProfile:
    name: str
    backend: str  # torch, torch-int8, ..., onnxruntime
    parameters: int | None
    nonzero_parameters: int | None
    size_bytes: int  # the weights as stored: model.safetensors, or the ONNX graph with its external data
    perplexity: float | None
    loss: float | None
    tokens_scored: int
    forward_ms: float | None  # batch 1 x full context
    forward_tokens: int | None
    generate_tokens_per_s: float | None
    timing_spread: float | None = None  # slowest timing round over fastest (speed.round_spread)
    timing_disturbed: bool | None = None  # the spread is beyond speed.DISTURBED_SPREAD: another process took the CPU

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_files(loaded: Any) -> list[Path]:
    """The files a backend reads its weights from."""
    graph = getattr(loaded.model, "graph_path", None)
    if graph is not None:
        graph = Path(graph)
        return [graph] + sorted(p for p in graph.parent.glob(graph.name + "*") if p != graph and p.is_file())
    return [Path(loaded.path) / "model.safetensors"]


def stored_parameters(loaded: Any) -> tuple[int | None, int | None]:
    """(parameters, nonzero) counted from what is stored: a tied head once, scales not counted.

    Integer weights count as stored (a pruned zero stays zero under symmetric quantization);
    packed int4 weights cannot be counted element by element and give None for nonzero.
    """
    if getattr(loaded.model, "graph_path", None) is not None:
        return loaded.model.num_parameters(), None
    import torch
    from safetensors import safe_open

    total, nonzero, packed = 0, 0, False
    with safe_open(str(Path(loaded.path) / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            last = key.rsplit(".", 1)[-1]
            if "scale" in last or "zero" in last:
                continue
            t = f.get_tensor(key)
            if t.dtype.is_floating_point or t.dtype == torch.int8:
                total += t.numel()
                nonzero += int(t.count_nonzero())
            else:  # int4 packed two to a byte (or into int32 words)
                packed = True
    if packed:
        from llmctl.models.shapes import count_parameters

        return count_parameters(loaded.config), None
    return total, nonzero


def backend_name(loaded: Any) -> str:
    graph = getattr(loaded.model, "graph_path", None)
    if graph is not None:
        return "onnxruntime" + ("-int8" if "int8" in Path(graph).name else "")
    scheme = (loaded.config.get("quantization") or {}).get("scheme")
    return f"torch-{scheme}" if scheme else "torch"


def profile_model(
    loaded: Any,
    tokens: np.ndarray | None,
    byte_lengths: np.ndarray | None,
    *,
    name: str,
    timing: SpeedResult | None = None,
    on_progress: OnProgress | None = None,
) -> ModelProfile:
    """Score `tokens` (None: no perplexity) and gather the stored figures; `timing` from `measure_speeds`."""
    from llmctl.evaluation.perplexity import evaluate_tokens

    ppl = loss = None
    scored = 0
    if tokens is not None:
        result = evaluate_tokens(loaded.model, tokens, byte_lengths, source=name, on_progress=on_progress)
        ppl, loss, scored = result.perplexity, result.loss, result.tokens
    params, nonzero = stored_parameters(loaded)
    return ModelProfile(
        name=name,
        backend=backend_name(loaded),
        parameters=params,
        nonzero_parameters=nonzero,
        size_bytes=sum(p.stat().st_size for p in weights_files(loaded)),
        perplexity=ppl,
        loss=loss,
        tokens_scored=scored,
        forward_ms=timing.forward_ms if timing else None,
        forward_tokens=timing.forward_tokens if timing else None,
        generate_tokens_per_s=timing.generate_tokens_per_s if timing else None,
        timing_spread=round(timing.spread, 3) if timing else None,
        timing_disturbed=is_disturbed(timing.spread) if timing else None,
    )


def profile_models(
    loaded: list[Any], tokens: np.ndarray | None, byte_lengths: np.ndarray | None, names: list[str], *, speed: bool = True,
    progress: Progress | None = None,
) -> list[ModelProfile]:
    """Profile several models on the same tokens; their timings are taken interleaved."""
    from llmctl.evaluation.speed import measure_speeds

    progress = silent_if_none(progress)
    timings: list[SpeedResult | None] = [None] * len(loaded)
    if speed:
        context = min(m.model.context_length for m in loaded)
        progress.stage(f"timing {len(loaded)} models, interleaved (forward at 1 x {context} tokens, greedy generation)",
                       unit="timings")
        timings = list(measure_speeds([m.model for m in loaded], context, loaded[0].config["vocab_size"],
                                      on_progress=progress.update))
    profiles = []
    for m, n, t in zip(loaded, names, timings):
        if tokens is not None:
            progress.stage(f"perplexity of {n} ({backend_name(m)}) on {len(tokens) - 1:,} tokens", unit="tokens")
        profiles.append(profile_model(m, tokens, byte_lengths, name=n, timing=t, on_progress=progress.update))
    return profiles


def val_tokens_of(loaded: Any, data: Path | None, max_tokens: int | None) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """The val tokens a model is judged on (its own dataset's, or `data`'s), their byte lengths, and why
    there are none when the model records no dataset that still exists."""
    from llmctl.artifacts import DatasetDir
    from llmctl.data.shards import TokenShards
    from llmctl.data.tokenizer import token_byte_lengths
    from llmctl.errors import LlmctlError
    from llmctl.evaluation.perplexity import check_same_tokenizer, dataset_of_model

    try:
        dataset = DatasetDir(data) if data else dataset_of_model(loaded.provenance, loaded.path)
    except LlmctlError as e:
        if data:
            raise
        return None, None, e.message
    check_same_tokenizer(dataset, Path(loaded.path) / "tokenizer.json")
    tokens = TokenShards(dataset.path).split("val")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    return tokens, token_byte_lengths(loaded.tokenizer), None
