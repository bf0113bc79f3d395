"""`compress` of a language model: magnitude or structured pruning, a recovery fine-tune, int8/int4 weights.

Judged by perplexity on the model's val split (or `--data`), with the forward latency and generation
speed of both models timed interleaved in this process (`llmctl.evaluation.profile`). The result is
written through `llmctl.compression.save`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.compression.save import compression_staging, publish_compressed, save_and_reload
from llmctl.compression.summary import Row, change, latency_row, number, size_rows, speed_change, timed
from llmctl.config.schema import CompressConfig
from llmctl.errors import LlmctlError
from llmctl.progress import Progress


def compress(loaded: Any, model_dir: Path, out_dir: Path, options: CompressConfig, *, data: Path | None = None,
             measure_speed: bool = True, progress: Progress) -> dict[str, Any]:
    """Compress the loaded float `gpt` model into `out_dir`; returns the report also written as compression.json."""
    from llmctl.evaluation.profile import profile_models, val_tokens_of

    if loaded.config.get("attention_bias") and (options.quantize != "none" or options.prune_method == "structured"):
        raise LlmctlError(
            f"{model_dir}: a model with q/k/v biases (attention_bias, e.g. from Qwen2); --quantize and structured pruning "
            "do not handle those biases yet. Use --prune with --prune-method global or layer, or export it as it is."
        )
    tokens, byte_lengths, no_data = val_tokens_of(loaded, data, options.eval_tokens)
    if tokens is None and (options.prune_method == "structured" and options.prune or options.recover_steps):
        raise LlmctlError(f"{no_data} Structured pruning and recovery need the model's data.")

    with compression_staging(out_dir) as work:
        model, pruning = _prune(loaded, options, tokens, progress)
        recovery = None
        if options.prune and options.recover_steps:
            model, recovery = _recover(loaded, model, options, work, data, progress)
        if options.quantize != "none":
            from llmctl.compression.quantization import quantize_model

            progress.stage(f"quantizing to {options.quantize}", unit="tensors")
            model = quantize_model(model, options.quantize, on_progress=progress.update)
        models = save_and_reload(model, loaded, model_dir, options, work, progress)
        before, after = profile_models(list(models), tokens, byte_lengths, [str(model_dir), str(out_dir)],
                                       speed=measure_speed, progress=progress)
        return publish_compressed(work, out_dir, _report(options, before, after, pruning, recovery, no_data))


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


def report_rows(report: dict[str, Any]) -> list[Row]:
    """The before/after table of a language model's compression.json, as text cells."""
    b, a = report["before"], report["after"]
    tokens = b.get("forward_tokens")
    generate = b["generate_tokens_per_s"], a["generate_tokens_per_s"]
    return [
        *size_rows(b, a),
        ("val perplexity", number(b["perplexity"], ".3f"), number(a["perplexity"], ".3f"),
         change(b["perplexity"], a["perplexity"], pct=True)),
        latency_row(f"forward latency (1 x {tokens} tokens)" if tokens else "forward latency (not measured)", b, a),
        ("generate tokens/s", *[timed(number(m["generate_tokens_per_s"], ".1f"), m) for m in (b, a)],
         speed_change(generate[1] / generate[0] if all(generate) else None)),
    ]


def report_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """What the report could not measure, as (what, why) for the lines under the table."""
    missing = report.get("perplexity_not_measured")
    return [("perplexity not measured", missing)] if missing else []
