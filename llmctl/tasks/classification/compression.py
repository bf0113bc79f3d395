"""`compress` of a sequence classifier: magnitude pruning and/or int8, judged by val accuracy and macro-F1.

The result is a model dir like any other (eval, export and serve load it without flags) with a
`compression.json` that compares both models on the model's own val split (or `--data`): size on
disk, parameters, accuracy, macro-F1 and the latency of one forward pass over a batch of val texts,
timed interleaved in this process (`llmctl.tasks.classification.profile`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.compression.save import compression_staging, publish_compressed, save_and_reload
from llmctl.compression.summary import Row, latency_row, number, points, size_rows
from llmctl.config.schema import CompressConfig
from llmctl.errors import LlmctlError
from llmctl.progress import Progress
from llmctl.tasks.classification.profile import ClassifierProfile, profile_classifiers, val_inputs_of


def compress(loaded: Any, model_dir: Path, out_dir: Path, options: CompressConfig, *, data: Path | None = None,
             measure_speed: bool = True, progress: Progress) -> dict[str, Any]:
    """Compress the loaded float classifier into `out_dir`; returns the report also written as compression.json."""
    check_options(options)
    inputs, no_data = val_inputs_of(loaded, data, options.eval_tokens)

    with compression_staging(out_dir) as work:
        model, pruning = loaded.model, None
        if options.prune:
            from llmctl.compression.pruning import prune_unstructured

            progress.stage(f"magnitude pruning ({options.prune_method}) to {options.prune:.0%} sparsity")
            pruning = {"method": options.prune_method, **prune_unstructured(model, options.prune, scope=options.prune_method)}
        if options.quantize != "none":
            from llmctl.compression.classifier_quant import quantize_classifier

            progress.stage(f"quantizing to {options.quantize}")
            model = quantize_classifier(model, options.quantize)
        models = save_and_reload(model, loaded, model_dir, options, work, progress)
        before, after = profile_classifiers(list(models), inputs, [str(model_dir), str(out_dir)], speed=measure_speed,
                                            progress=progress)
        return publish_compressed(work, out_dir, _report(options, before, after, pruning, models[1], no_data))


def check_options(options: CompressConfig) -> None:
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


def report_rows(report: dict[str, Any]) -> list[Row]:
    """The before/after table of a classifier's compression.json, as text cells."""
    b, a = report["before"], report["after"]
    examples = f" ({b['examples']:,} texts)" if b["examples"] else ""
    shape = f" ({b['forward_batch']} x {b['forward_tokens']} tokens)" if b["forward_ms"] else ""
    return [
        *size_rows(b, a),
        (f"val accuracy{examples}", number(b["accuracy"], ".4f"), number(a["accuracy"], ".4f"),
         points(b["accuracy"], a["accuracy"])),
        ("val macro-F1", number(b["macro_f1"], ".4f"), number(a["macro_f1"], ".4f"), points(b["macro_f1"], a["macro_f1"])),
        latency_row(f"forward latency{shape}", b, a),
    ]


def report_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """What the report could not measure, as (what, why) for the lines under the table."""
    missing = report.get("metrics_not_measured")
    return [("accuracy and F1 not measured", missing)] if missing else []
