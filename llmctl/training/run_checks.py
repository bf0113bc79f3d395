"""What a training run checks before any work: the run dir rules of DESIGN.md (and that the run dir is not one
of the run's inputs), the batch split over processes, the precision, and on resume that the model is the one
the run started with."""

from __future__ import annotations

from pathlib import Path

from llmctl.artifacts import RunDir, WriteFailed, refuse_output_over_inputs
from llmctl.config.schema import Recipe, TrainConfig
from llmctl.errors import LlmctlError
from llmctl.training.checkpoints import check_checkpoint


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, recipe: Recipe | None = None) -> tuple[int, Path] | None:
    """Apply DESIGN.md's run dir rules before any work; return the checkpoint to resume from.

    With `recipe`, a run dir that is one of its inputs or lies inside one (the dataset dir, a source
    directory, model.init_from), or holds an input where the run replaces files, is refused too.
    """
    if resume and overwrite:
        raise LlmctlError("--resume and --overwrite contradict each other; choose one.", kind="usage")
    rd = RunDir(Path(run_dir))
    if rd.path.exists() and not rd.path.is_dir():
        raise LlmctlError(f"--run-dir {rd.path}: is an existing file; name a directory (new, or a run dir to resume).")
    if recipe is not None:
        _refuse_run_dir_over_inputs(rd, recipe)
    latest = rd.latest_checkpoint()
    if resume:
        if latest is None:
            raise LlmctlError(f"{rd.path}: no checkpoint to resume from; run without --resume to start it.")
        check_checkpoint(latest[1])
        return latest
    if latest is not None and not overwrite:
        raise LlmctlError(
            f"{rd.path} already has checkpoints (newest {latest[1].name}); pass --resume to continue it "
            "or --overwrite to start over."
        )
    return None


def _run_inputs(recipe: Recipe) -> list[tuple[str, Path]]:
    """What a training run reads, as (what, path): the dataset dir, local sources, tokenizer, init_from."""
    inputs = [("the dataset dir", recipe.data_dir())]
    for key, specs in recipe.data.source_lists():
        for i, spec in enumerate(specs):
            if not spec.path.startswith("builtin:") and Path(spec.path).exists():
                inputs.append((f"{key}[{i}]", Path(spec.path)))
    if recipe.data.tokenizer:
        inputs.append(("data.tokenizer", Path(recipe.data.tokenizer)))
    init = recipe.model.init_from
    if init and Path(init).exists():
        inputs.append(("model.init_from", Path(init)))
    return inputs


def _refuse_run_dir_over_inputs(rd: RunDir, recipe: Recipe) -> None:
    """A run writes recipe.yaml, metrics.jsonl, checkpoints/, model/ (and tracker logs) into its run dir and
    --overwrite deletes some of them: refuse a run dir that is an input, lies inside one, or would replace one."""
    inputs = _run_inputs(recipe)
    refuse_output_over_inputs("--run-dir", rd.path, inputs)
    replaced = [rd.model.path, rd.checkpoints, rd.metrics, rd.recipe]
    for what, path in inputs:
        source = Path(path).resolve()
        for part in replaced:
            if source == part.resolve() or part.resolve() in source.parents:
                raise LlmctlError(
                    f"{what} {path}: inside the run dir's {part.name}, which training into --run-dir {rd.path} "
                    "replaces; train into another --run-dir (or copy the input elsewhere first)."
                )


def check_batch_split(cfg: TrainConfig, processes: int) -> None:
    """Refuse a batch that the processes (and a given micro-batch) cannot split evenly, before any starts."""
    if cfg.batch_size % processes:
        raise LlmctlError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of the process count ({processes}); "
            "change one of them."
        )
    micro = cfg.micro_batch_size
    if isinstance(micro, int) and cfg.batch_size % (micro * processes):
        raise LlmctlError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({micro} x {processes}); choose a train.micro_batch_size that divides {cfg.batch_size // processes} "
            "(each process's share)."
        )


def resume_remedy(rd: RunDir, failure: WriteFailed) -> str:
    """What to do after a write failed mid-run: the newest whole checkpoint, and how to continue from it."""
    latest = rd.latest_checkpoint()
    if latest is None:
        return f"No checkpoint was written yet: {failure.fix}, then run the command again."
    return (f"The newest checkpoint, {latest[1]}, is intact: {failure.fix}, then run `llmctl train` again with --resume "
            "(instead of --overwrite) to continue from it.")


def check_precision(precision: str) -> str:
    """Accelerate's mixed_precision for train.precision, refusing one this machine cannot run."""
    import torch

    if precision == "fp32":
        return "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise LlmctlError("train.precision: fp16 needs a CUDA GPU; on CPU use bf16 or fp32.")
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise LlmctlError("train.precision: this GPU does not support bf16; use fp16 or fp32.")
    return precision


def check_same_model(run_dir: RunDir, recipe: Recipe) -> None:
    """On resume, refuse a recipe whose model section (or LoRA adapters) differs from the one the run started with."""
    import yaml

    if not run_dir.recipe.is_file():
        return
    saved = yaml.safe_load(run_dir.recipe.read_text(encoding="utf-8")) or {}
    old = saved.get("model", {})
    new = recipe.model.model_dump(mode="json")
    changed = [f"model.{k}" for k in sorted(new) if old.get(k) != new[k] and k != "dropout"]
    old_lora, new_lora = (saved.get("train") or {}).get("lora"), recipe.train.model_dump(mode="json")["lora"]
    if (old_lora is None) != (new_lora is None) or (old_lora and new_lora and any(
            old_lora.get(k) != new_lora[k] for k in ("rank", "alpha", "targets"))):
        changed.append("train.lora")
    if changed:
        raise LlmctlError(f"--resume: {', '.join(changed)} differ from {run_dir.recipe}; a resumed run keeps its model shape.")
