"""`compress` of a sequence classifier: magnitude pruning and/or int8, judged by val accuracy and macro-F1.

`compress_model` hands a classifier model dir here once it has checked the output path and loaded
the model. The result is a model dir like any other (eval, export and serve load it without flags)
with a `compression.json` that compares both models on the model's own val split (or `--data`):
size on disk, parameters, accuracy, macro-F1 and the latency of one forward pass over a batch of
val texts, timed interleaved in this process.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.artifacts import replace_dir_atomic, staging_dir, write_json_atomic
from llmctl.config.schema import CompressConfig
from llmctl.errors import LlmctlError
from llmctl.progress import Progress, silent_if_none

COMPRESSION_JSON = "compression.json"
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


def check_classifier_options(options: CompressConfig) -> None:
    """Refuse what classifiers do not take, before any work, naming what to use instead."""
    from llmctl.compression.classifier_quant import check_classifier_scheme

    if options.quantize != "none":
        check_classifier_scheme(options.quantize)
    if options.prune and options.prune_method == "structured":
        raise LlmctlError(
            "--prune-method structured removes attention heads and MLP channels of gpt language models; a classifier "
            "takes --prune-method global or layer (magnitude pruning of its recurrent or decoder weight matrices)."
        )
    if options.recover_steps:
        raise LlmctlError(
            "--recover-steps fine-tunes gpt language models after pruning; compress does not fine-tune classifiers: "
            "drop --recover-steps (or set compress.recover_steps: 0 in the recipe)."
        )


def compress_classifier(
    loaded: Any,
    model_dir: Path,
    out_dir: Path,
    options: CompressConfig,
    *,
    data: Path | None = None,
    measure_speed: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress the loaded float classifier into `out_dir`; returns the report also written as compression.json."""
    from llmctl.compression.pipeline import save_compressed
    from llmctl.models.model_dir import load_model_dir

    progress = silent_if_none(progress)
    check_classifier_options(options)
    inputs, no_data = val_inputs_of(loaded, data, options.eval_tokens)

    work = staging_dir(Path(out_dir))
    try:
        model, pruning = loaded.model, None
        if options.prune:
            from llmctl.compression.pruning import prune_unstructured

            progress.stage(f"magnitude pruning ({options.prune_method}) to {options.prune:.0%} sparsity")
            pruning = {"method": options.prune_method, **prune_unstructured(model, options.prune, scope=options.prune_method)}
        if options.quantize != "none":
            from llmctl.compression.classifier_quant import quantize_classifier

            progress.stage(f"quantizing to {options.quantize}")
            model = quantize_classifier(model, options.quantize)
        progress.stage("writing the model dir")
        save_compressed(model, loaded, model_dir, options, work / "model")
        progress.stage("loading both models (the compressed one as written)")
        models = [load_model_dir(model_dir), load_model_dir(work / "model")]
        before, after = profile_classifiers(models, inputs, [str(model_dir), str(out_dir)], speed=measure_speed,
                                            progress=progress)
        report = _report(options, before, after, pruning, models[1], no_data)
        write_json_atomic(work / "model" / COMPRESSION_JSON, report)
        replace_dir_atomic(work / "model", Path(out_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def val_inputs_of(loaded: Any, data: Path | None, max_tokens: int | None) -> tuple[Any, str | None]:
    """The labelled val texts a classifier is judged on (its own dataset's, or `data`'s), at most
    `max_tokens` real tokens of them, or None and why, when the model records no dataset that still exists."""
    from llmctl.evaluation.classifier_eval import inputs_from_dataset
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
    from llmctl.evaluation.classifier_eval import evaluate_classifier
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


def _report(options: CompressConfig, before: ClassifierProfile, after: ClassifierProfile, pruning: dict | None,
            compressed: Any, no_data: str | None) -> dict[str, Any]:
    from llmctl.models.quantized_classifiers import int8_compute

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def delta(a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None

    quantization = compressed.config.get("quantization")
    return {
        "task": "classification",
        "options": options.model_dump(mode="json"),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "accuracy_change": delta(before.accuracy, after.accuracy),
        "macro_f1_change": delta(before.macro_f1, after.macro_f1),
        "size_ratio": ratio(after.size_bytes, before.size_bytes),
        "forward_speedup": ratio(before.forward_ms, after.forward_ms),
        "pruning": pruning,
        "quantization": {**quantization, **int8_compute(compressed.config["family"])} if quantization else None,
        "recovery": None,
        "metrics_not_measured": no_data,
    }
