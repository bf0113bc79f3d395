"""`compress`: prune, optionally recover by fine-tuning, quantize, and measure what it cost and saved.

The result is a model dir like any other (eval, export and serve load it without flags) with a
`compression.json` beside the weights. Everything is written under a staging dir and moved into
place at the end, so a failure leaves nothing under the output name. Classifier model dirs are
handed to `llmctl.compression.classifier_pipeline` once loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmctl.artifacts import check_output_dir, replace_dir_atomic, staging_dir, write_json_atomic
from llmctl.config.schema import CompressConfig
from llmctl.errors import LlmctlError
from llmctl.progress import Progress, silent_if_none

COMPRESSION_JSON = "compression.json"


def describe(options: CompressConfig) -> str:
    parts = []
    if options.prune:
        parts.append(f"{options.prune_method} pruning {options.prune:.0%}")
    if options.prune and options.recover_steps:
        parts.append(f"{options.recover_steps} recovery steps")
    if options.quantize != "none":
        parts.append(options.quantize)
    return ", ".join(parts) or "nothing"


def compress_model(
    model_dir: Path,
    out_dir: Path,
    options: CompressConfig,
    *,
    data: Path | None = None,
    overwrite: bool = False,
    measure_speed: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress the model dir at `model_dir` into `out_dir`; returns the report also written as compression.json.

    `progress` hears each stage, and how far quantizing and measuring are."""
    from llmctl.evaluation.profile import profile_models, val_tokens_of
    from llmctl.models.model_dir import load_model_dir

    from llmctl.models.loading import require_model_dir

    progress = silent_if_none(progress)
    require_model_dir(model_dir, "compress")  # the path first: a typo is not "nothing to do"
    check_output_dir(out_dir, overwrite=overwrite, sources=[model_dir], marker="config.json")
    if options.prune == 0 and options.quantize == "none":
        raise LlmctlError("nothing to do: give --prune S (0 < S < 1) and/or --quantize (int8, int8-weight, int4-weight).")
    if options.recover_steps and not options.prune:
        raise LlmctlError("--recover-steps fine-tunes after pruning; give --prune too.")
    loaded = load_model_dir(model_dir)
    if loaded.config.get("quantization"):
        raise LlmctlError(
            f"{model_dir}: already quantized ({loaded.config['quantization'].get('scheme')}); compress the float model it came from."
        )
    if getattr(loaded.model, "task", None) == "classification":
        from llmctl.compression.classifier_pipeline import compress_classifier

        return compress_classifier(loaded, Path(model_dir), Path(out_dir), options, data=data,
                                   measure_speed=measure_speed, progress=progress)
    if loaded.config.get("attention_bias") and (options.quantize != "none" or options.prune_method == "structured"):
        raise LlmctlError(
            f"{model_dir}: a model with q/k/v biases (attention_bias, e.g. from Qwen2); --quantize and structured pruning "
            "do not handle those biases yet. Use --prune with --prune-method global or layer, or export it as it is."
        )
    tokens, byte_lengths, no_data = val_tokens_of(loaded, data, options.eval_tokens)
    if tokens is None and (options.prune_method == "structured" and options.prune or options.recover_steps):
        raise LlmctlError(f"{no_data} Structured pruning and recovery need the model's data.")

    work = staging_dir(Path(out_dir))
    try:
        model, pruning = _prune(loaded, options, tokens, progress)
        recovery = None
        if options.prune and options.recover_steps:
            model, recovery = _recover(loaded, model, options, work, data, progress)
        if options.quantize != "none":
            from llmctl.compression.quantization import quantize_model

            progress.stage(f"quantizing to {options.quantize}", unit="tensors")
            model = quantize_model(model, options.quantize, on_progress=progress.update)
        progress.stage("writing the model dir")
        save_compressed(model, loaded, model_dir, options, work / "model")
        progress.stage("loading both models (the compressed one as written)")
        original = load_model_dir(model_dir)
        before, after = profile_models(
            [original, load_model_dir(work / "model")], tokens, byte_lengths, [str(model_dir), str(out_dir)],
            speed=measure_speed, progress=progress,
        )
        report = _report(options, before, after, pruning, recovery, no_data)
        write_json_atomic(work / "model" / COMPRESSION_JSON, report)
        replace_dir_atomic(work / "model", Path(out_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _prune(loaded: Any, options: CompressConfig, tokens: Any, progress: Progress) -> tuple[Any, dict | None]:
    if not options.prune:
        return loaded.model, None
    from llmctl.compression.pruning import prune_structured, prune_unstructured

    if options.prune_method == "structured":
        import torch

        T = loaded.model.context_length
        n = max(1, min(options.calibration_tokens, len(tokens) - 1) // T)
        if len(tokens) < T + 1:
            raise LlmctlError(f"structured pruning: the val split has {len(tokens)} tokens, fewer than one context ({T + 1}).")
        calibration = torch.from_numpy(tokens[: n * T].astype("int64")).view(n, T)  # (n, T)
        progress.stage(f"structured pruning: scoring heads and channels on {n * T:,} val tokens")
        before = {k: loaded.config.get(k) for k in ("n_head", "n_kv_head", "d_ff")}
        model = prune_structured(loaded.model, options.prune, calibration)
        after = {k: getattr(model.config, k) for k in ("n_head", "n_kv_head", "d_ff")}
        return model, {"method": "structured", "fraction": options.prune, "before": before, "after": after}
    progress.stage(f"magnitude pruning ({options.prune_method}) to {options.prune:.0%} sparsity")
    stats = prune_unstructured(loaded.model, options.prune, scope=options.prune_method)
    return loaded.model, {"method": options.prune_method, **stats}


def _recover(
    loaded: Any, model: Any, options: CompressConfig, work: Path, data: Path | None, progress: Progress
) -> tuple[Any, dict]:
    """Fine-tune the pruned model through the normal trainer; unstructured zeros stay zero."""
    from llmctl.config.schema import Recipe
    from llmctl.evaluation.perplexity import dataset_of_model
    from llmctl.models.model_dir import load_model_dir, save_model_dir
    from llmctl.training.trainer import train

    recorded = loaded.provenance.get("recipe")
    if not recorded:
        raise LlmctlError(f"{loaded.path}/llmctl.json records no recipe; recovery fine-tuning needs the one it was trained with.")
    save_model_dir(model, work / "pruned", tokenizer_path=loaded.path / "tokenizer.json", provenance=loaded.provenance)
    recipe = Recipe.model_validate(recorded)
    shapes = {k: v for k, v in model.config.to_dict().items() if k in recipe.model.model_fields and k != "family"}
    dataset = Path(data) if data else dataset_of_model(loaded.provenance, loaded.path).path
    steps = options.recover_steps
    recipe = recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={**shapes, "init_from": str(work / "pruned")}),
            "data": recipe.data.model_copy(update={"dir": str(dataset)}),
            "train": recipe.train.model_copy(
                update={
                    "max_steps": steps,
                    "lr": options.recover_lr or recipe.train.lr / 10,
                    "warmup_steps": min(recipe.train.warmup_steps, steps // 10),
                    "eval_every": steps,
                    "checkpoint_every": steps,
                    "keep_best": False,
                    "patience": None,
                    "keep_sparsity": options.prune_method != "structured",
                    "compile": False,
                    "lora": None,  # a LoRA-trained model dir holds merged weights: recovery tunes them all
                    "epochs": None,  # recover_steps is the budget
                }
            ),
        }
    )
    progress.stage(f"recovery fine-tune: {steps} steps at lr {recipe.train.lr:g}", unit="steps")
    result = train(recipe, work / "recover", overwrite=True, callbacks=_RecoveryProgress(progress))
    recovered = load_model_dir(result.model_dir).model
    return recovered, {"steps": steps, "lr": recipe.train.lr, "final_loss": result.loss, "val_loss": result.val_loss}


def _report(options: CompressConfig, before: Any, after: Any, pruning: dict | None, recovery: dict | None, no_data: str | None) -> dict:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    delta = None
    if before.perplexity and after.perplexity:
        delta = 100 * (after.perplexity / before.perplexity - 1)
    return {
        "options": options.model_dump(mode="json"),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "perplexity_change_pct": delta,
        "size_ratio": ratio(after.size_bytes, before.size_bytes),
        "forward_speedup": ratio(before.forward_ms, after.forward_ms),
        "generate_speedup": ratio(after.generate_tokens_per_s, before.generate_tokens_per_s),
        "pruning": pruning,
        "recovery": recovery,
        "perplexity_not_measured": no_data,
    }


def save_compressed(model: Any, loaded: Any, model_dir: Path, options: CompressConfig, dest: Path) -> None:
    """Write a compressed model as a model dir: the source's tokenizer and usage settings (chat template,
    labels), and provenance that records where it came from and how it was compressed."""
    from llmctl.models.model_dir import carried_config, save_model_dir

    provenance = {
        **loaded.provenance,
        "compressed_from": str(Path(model_dir).resolve()),
        "compression": options.model_dump(mode="json"),
    }
    save_model_dir(model, dest, tokenizer_path=loaded.path / "tokenizer.json", provenance=provenance,
                   extra_config=carried_config(loaded.config))


class _RecoveryProgress:
    """The recovery fine-tune's steps as the current stage's count; its eval rows as notes."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.max_steps = 0

    def on_start(self, info: dict[str, Any]) -> None:
        self.max_steps = info["max_steps"]
        self.progress.update(info["start_step"], self.max_steps)

    def on_step(self, step: int, row: dict[str, Any] | None) -> None:
        self.progress.update(step, self.max_steps)

    def on_eval(self, row: dict[str, Any]) -> None:
        self.progress.note(f"recovery step {row['step']}: val loss {row['val_loss']:.4f}")

    def on_message(self, text: str) -> None:
        self.progress.note(text)
