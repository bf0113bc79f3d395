"""The training engine: one Accelerate loop for every model family, one process or many.

It knows nothing of typer or rich: progress goes to a `TrainCallbacks` object.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.artifacts import (
    DatasetDir,
    RunDir,
    WriteFailed,
    refuse_output_over_inputs,
    remove_path,
    write_atomic,
    writing,
)
from llmctl.config.loader import recipe_to_yaml
from llmctl.config.schema import Recipe, TrainConfig
from llmctl.errors import EXIT_FAILURE, LlmctlError

# A run whose recipe evaluates less often than the run is long gets about this many evaluations instead.
EVALS_IN_A_SHORT_RUN = 5


class TrainCallbacks:
    """Hooks the CLI uses to draw progress; every method is optional."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_step(self, step: int, row: dict[str, Any] | None) -> None: ...

    def on_eval(self, row: dict[str, Any]) -> None: ...

    def on_message(self, text: str) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    step: int
    tokens: int
    loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, recipe: Recipe | None = None) -> tuple[int, Path] | None:
    """Apply DESIGN.md's run dir rules before any work; return the checkpoint to resume from.

    With `recipe`, a run dir that is one of its inputs or lies inside one (the dataset dir, a source
    directory, model.init_from), or holds an input where the run replaces files, is refused too.
    """
    from llmctl.training.checkpoints import check_checkpoint

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


def scaled_eval_every(cfg: TrainConfig, max_steps: int, steps_per_epoch: int | None) -> tuple[int, str | None]:
    """The evaluation interval (steps) a run of `max_steps` uses, and a note when it is not train.eval_every.

    An eval_every beyond the run's length (a recipe written for more data or steps) would evaluate once,
    at the end, leaving best-model selection and early stopping nothing to choose from: such a run
    evaluates once an epoch when it trains 2 or more epochs, else EVALS_IN_A_SHORT_RUN times. An
    eval_every equal to max_steps is a deliberate single evaluation and is kept.
    """
    if cfg.eval_every <= max_steps or max_steps < 2:
        return cfg.eval_every, None
    if cfg.epochs and cfg.epochs >= 2 and steps_per_epoch and steps_per_epoch < max_steps:
        every, how = steps_per_epoch, "once an epoch"
    else:
        every = math.ceil(max_steps / EVALS_IN_A_SHORT_RUN)
        how = f"{math.ceil(max_steps / every)} evaluations"
    note = (
        f"train.eval_every ({cfg.eval_every}) is beyond this run's {max_steps} steps, so it would evaluate only at the "
        f"end: evaluating every {every} steps ({how}) instead; set train.eval_every={max_steps} for one evaluation"
    )
    return every, note


def _resume_remedy(rd: RunDir, failure: WriteFailed) -> str:
    """What to do after a write failed mid-run: the newest whole checkpoint, and how to continue from it."""
    latest = rd.latest_checkpoint()
    if latest is None:
        return f"No checkpoint was written yet: {failure.fix}, then run the command again."
    return (f"The newest checkpoint, {latest[1]}, is intact: {failure.fix}, then run `llmctl train` again with --resume "
            "(instead of --overwrite) to continue from it.")


def _check_precision(precision: str) -> str:
    import torch

    if precision == "fp32":
        return "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise LlmctlError("train.precision: fp16 needs a CUDA GPU; on CPU use bf16 or fp32.")
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise LlmctlError("train.precision: this GPU does not support bf16; use fp16 or fp32.")
    return precision


def _same_model(run_dir: RunDir, recipe: Recipe) -> None:
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


def _carried_chat_template(recipe: Recipe, task: Any) -> dict[str, Any]:
    """config.json's chat_template for the trained model: the one the instruct data was rendered with,
    else the one of the model.init_from dir it continues (an llmctl model dir's, or a Hugging Face
    dir's), so serve keeps prompting it the same way."""
    if task.kind == "classification":
        return {}
    template = getattr(task, "chat_template", None)
    if template is None and recipe.model.init_from and Path(recipe.model.init_from).is_dir():
        from llmctl.data.chat_template import chat_template_beside

        found = chat_template_beside(Path(recipe.model.init_from))
        template = found[0] if found else None
    return {"chat_template": template} if isinstance(template, str) else {}


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or the CPU allocator's (a RuntimeError saying it can't allocate)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _nonfinite_hint(step: int, last_checkpoint: int | None, precision: str) -> str:
    where = f"the last good checkpoint is step-{last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    fp16 = "; fp16 overflows easily: try bf16 or fp32" if precision == "fp16" else ""
    return (
        f"loss or gradient became NaN/inf at step {step}; {where}. Lower train.lr, set train.grad_clip "
        f"(e.g. 1.0), add warmup_steps{fp16}, or set train.skip_nonfinite: N to skip such batches."
    )


def resolve_micro_batch(recipe: Recipe, processes: int, device: str, vocab_size: int) -> tuple[int, Any]:
    """The micro-batch to run (choosing it under `auto`) and the memory plan for it.

    `vocab_size` is the dataset tokenizer's, used when the recipe leaves model.vocab_size null.
    """
    from llmctl.training.memory import choose_micro_batch, estimate_memory, free_device_memory
    from llmctl.units import parse_memory

    cfg = recipe.train
    if recipe.data.task == "classification":  # the memory model covers the gpt decoder only
        if cfg.micro_batch_size == "auto":
            raise LlmctlError("train.micro_batch_size: auto plans the memory of language models; give a number "
                              "(or null) for classification.")
        check_batch_split(cfg, processes)
        return cfg.micro_batch_size or cfg.batch_size // processes, None
    from llmctl.training.tasks import model_config_of

    model_config = model_config_of(recipe, vocab_size)
    budget = parse_memory(cfg.max_memory) if cfg.max_memory is not None else free_device_memory(device)
    micro = cfg.micro_batch_size
    if micro == "auto":
        if budget is None:
            raise LlmctlError("train.micro_batch_size: auto needs train.max_memory on a device whose free memory is unknown.")
        micro = choose_micro_batch(
            model_config, cfg.optimizer, cfg.precision, cfg.batch_size, processes, budget,
            strategy=cfg.strategy, device=device,
        )
    if micro is None:
        check_batch_split(cfg, processes)
        micro = cfg.batch_size // processes  # each process its share of the batch, no accumulation
    plan = estimate_memory(
        model_config, cfg.optimizer, cfg.precision, micro,
        processes=processes, strategy=cfg.strategy, device=device, budget_bytes=budget,
    )
    return micro, plan


def _cap_cuda_memory(device: Any, budget_bytes: int) -> None:
    """Make train.max_memory a hard limit on CUDA: the caching allocator raises out-of-memory past it,
    so `auto` probing and training both stay inside the budget on a shared GPU."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), index)


def _probe_on_gpu(accelerator: Any, model: Any, batches: Any, recipe: Recipe, world: int, estimated: int, plan: Any) -> tuple[int, Any]:
    """On CUDA, `auto` tries real steps from twice the estimate down; returns the size and its plan."""
    import torch.nn.functional as F

    from llmctl.training.autobatch import compatible_micro_batches, probe_micro_batch
    from llmctl.training.memory import estimate_memory

    starts = batches.starts(0)

    def step_loss(m: Any, size: int) -> Any:
        x, y = batches.rows(starts[:size])
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        with accelerator.autocast():
            logits = m(x)  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    candidates = [c for c in compatible_micro_batches(recipe.train.batch_size, world) if c <= 2 * estimated]
    micro = probe_micro_batch(accelerator, model, step_loss, candidates, plan.optimizer_bytes)
    return micro, estimate_memory(
        accelerator.unwrap_model(model).config.to_dict(), recipe.train.optimizer, recipe.train.precision, micro, processes=world,
        strategy=recipe.train.strategy, device=str(accelerator.device), budget_bytes=plan.budget_bytes,
    )


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: TrainCallbacks | None = None,
) -> TrainResult:
    """Train the recipe's model on its prepared dataset, writing the run dir of DESIGN.md.

    A write that fails on a full disk or a refused permission (a checkpoint, the model dir, the metrics
    log) is a WriteFailed naming the newest intact checkpoint and saying that --resume continues from it.
    """
    try:
        return _train(recipe, Path(run_dir), resume=resume, overwrite=overwrite, callbacks=callbacks)
    except WriteFailed as failure:
        raise failure.with_remedy(_resume_remedy(RunDir(Path(run_dir)), failure)) from None


def _train(recipe: Recipe, run_dir: Path, *, resume: bool, overwrite: bool, callbacks: TrainCallbacks | None) -> TrainResult:
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    from llmctl.models import build_model
    from llmctl.models.model_dir import copy_model_dir, save_model_dir
    from llmctl.training.checkpoints import MetricsLog, load_checkpoint, save_checkpoint
    from llmctl.training.optim import build_optimizer, build_schedule, l1_penalty
    from llmctl.training.tasks import build_task, monitor_is_better, steps_for_epochs

    # Accelerate warns on every save that tied embeddings are stored once; that is intended.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    cb = callbacks or TrainCallbacks()
    cfg = recipe.train
    if cfg.log_with:
        from llmctl.training.trackers import check_trackers

        check_trackers(cfg.log_with)
    rd = RunDir(Path(run_dir))
    resume_from = check_run_dir(rd.path, resume=resume, overwrite=overwrite, recipe=recipe)
    if resume_from:
        _same_model(rd, recipe)
    mixed = _check_precision(cfg.precision)

    dataset = DatasetDir(recipe.data_dir())
    task = build_task(recipe)
    max_steps = steps_for_epochs(cfg.epochs, task.train_examples(), cfg.batch_size) if cfg.epochs else cfg.max_steps
    eval_every, eval_note = scaled_eval_every(cfg, max_steps, steps_for_epochs(1, task.train_examples(), cfg.batch_size))

    from llmctl.training.launch import cpu_workers

    distributed = PartialState(cpu=cpu_workers())
    world = distributed.num_processes
    micro, plan = resolve_micro_batch(recipe, world, str(distributed.device), task.vocab_size)
    check_batch_split(cfg.model_copy(update={"micro_batch_size": micro}), world)
    accum = cfg.batch_size // (micro * world)
    accelerator = Accelerator(
        cpu=cpu_workers(),
        mixed_precision=mixed,
        gradient_accumulation_steps=accum,
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if cfg.compile else "no",
        log_with=list(cfg.log_with) or None,
        project_dir=rd.path if cfg.log_with else None,
    )
    rank, main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device

    set_seed(recipe.run.seed)
    model_config = task.model_config()
    model = build_model(model_config)
    # A LoRA checkpoint holds the adapters alone: the frozen base comes from init_from on resume too.
    if recipe.model.init_from and (not resume_from or cfg.lora):
        from llmctl.models.init_from import load_weights_into

        load_weights_into(model, Path(recipe.model.init_from))
    adapters: list[str] = []
    if cfg.lora:
        from llmctl.training.lora import apply_lora, base_fingerprint

        if cfg.keep_sparsity:
            raise LlmctlError("train.keep_sparsity cannot be kept with train.lora: merging the adapters fills the zeros; "
                              "set train.lora: null to fine-tune all weights.")
        base_fp = base_fingerprint(model)
        adapters = apply_lora(model, cfg.lora)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg)
    if adapters and cfg.strategy == "fsdp" and world > 1:
        raise LlmctlError("train.lora works with strategy ddp only (FSDP flattens frozen and trained weights together).")
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.keep_sparsity and cfg.strategy == "fsdp" and world > 1:
        raise LlmctlError("train.keep_sparsity works with strategy ddp only (FSDP flattens the weight matrices).")
    # Weights that start at zero (a pruned model) stay zero: a mask for each trained matrix that has any.
    sparsity_masks = [
        (p, p.ne(0).to(p.dtype)) for p in accelerator.unwrap_model(model).parameters()
        if cfg.keep_sparsity and p.requires_grad and p.dim() >= 2 and not p.all()
    ]
    accelerator.register_for_checkpointing(scheduler)
    adapter_keys = None
    if adapters:
        from llmctl.training.checkpoints import keep_adapters_only
        from llmctl.training.lora import is_adapter_key

        keep_adapters_only(accelerator)
        adapter_keys = {k for k in model.state_dict() if is_adapter_key(k)}
    batches = task.batches(cfg.batch_size, recipe.run.seed)
    if cfg.max_memory is not None and device.type == "cuda":
        from llmctl.units import parse_memory

        _cap_cuda_memory(device, parse_memory(cfg.max_memory))
    if cfg.micro_batch_size == "auto" and device.type == "cuda" and task.kind == "lm":
        micro, plan = _probe_on_gpu(accelerator, model, batches, recipe, world, micro, plan)
        accum = cfg.batch_size // (micro * world)
        accelerator.gradient_accumulation_steps = accum

    metrics = MetricsLog(rd.metrics, enabled=main)
    state: dict[str, Any] = {"tokens": 0, "examples": 0, "elapsed_s": 0.0, "best_val_loss": None, "best_monitor": None,
                             "best_step": None, "bad_evals": 0, "skipped": 0}
    if adapters:
        state["lora_base"] = base_fp
    start_step = 0
    if resume_from:
        # Load before writing anything, so a refused checkpoint leaves the run dir as it was.
        saved = load_checkpoint(accelerator, resume_from[1], adapter_keys)
        if adapters and saved.get("lora_base") not in (None, base_fp):
            raise LlmctlError(
                f"--resume: the base weights ({recipe.model.init_from or 'the seed'}'s) are not those the adapters of "
                f"{resume_from[1]} were trained on; restore that base model dir, or pass --overwrite to start over."
            )
        start_step = saved["step"]
        state.update({k: saved[k] for k in state if k in saved})
        metrics.truncate_after(start_step)
    tracker_dir = rd.path / (recipe.run.name or rd.path.name)  # where Accelerate's trackers write (TensorBoard events)
    if main:
        stale = rd.stale_temporaries()  # what a killed run left half-written (a copy of model/, a checkpoint)
        for path in stale:
            remove_path(path)
        if stale:
            cb.on_message(f"removed {len(stale)} half-written temporary file(s) an interrupted run left in {rd.path}: "
                          f"{', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''}")
        if overwrite and rd.path.exists():
            for child in (rd.checkpoints, rd.model.path, tracker_dir):
                shutil.rmtree(child, ignore_errors=True)
        if not resume_from:
            rd.metrics.unlink(missing_ok=True)
        with writing(f"the run dir {rd.path}", rd.path):
            rd.path.mkdir(parents=True, exist_ok=True)
            write_atomic(rd.recipe, recipe_to_yaml(recipe))
    accelerator.wait_for_everyone()
    if cfg.log_with:  # trackers write on the main process only (Accelerate's on_main_process)
        from llmctl.training.trackers import flat_config, tracker_row

        # On resume TensorBoard drops the events logged after the checkpoint, as metrics.jsonl is cut back.
        purge = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}
        accelerator.init_trackers(tracker_dir.name, config=flat_config(recipe.model_dump(mode="json")), init_kwargs=purge)
    last_checkpoint = start_step or None

    evaluate_on_val = task.make_evaluator(micro, rank, world)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    provenance_base = {
        "llmctl_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "dataset": {"dir": str(dataset.path.resolve()), "fingerprint": task.fingerprint},
        "run_dir": str(rd.path.resolve()),
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if adapters:
        from llmctl.training.lora import adapter_record, merged_state_dict

        base_parameters = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        provenance_base["adapter"] = adapter_record(cfg.lora, adapters, trainable, base_parameters, recipe.model.init_from)
    model_extra = _carried_chat_template(recipe, task)

    def evaluate() -> dict[str, float]:
        model.eval()
        row = evaluate_on_val(model, accelerator)
        model.train()
        return row

    def save_model_to(dest: Path, step: int, extra: dict[str, Any]) -> None:
        """Every process joins (a sharded model is gathered); the main one writes. LoRA adapters are
        merged into the weights they adapt, so the model dir is a plain one."""
        if adapters:
            full_state = merged_state_dict(accelerator.unwrap_model(model)) if main else None
        else:
            full_state = accelerator.get_state_dict(model)
        if main:
            save_model_dir(
                accelerator.unwrap_model(model),
                dest,
                tokenizer_path=task.tokenizer_path,
                provenance={**provenance_base, "step": step, "tokens": state["tokens"], "metrics": extra},
                state_dict=full_state,
                extra_config=model_extra,
            )
        accelerator.wait_for_everyone()

    def accumulate_gradients(step: int) -> tuple[torch.Tensor, int]:
        """Forward and backward over this process's micro-batches of `step`; returns the summed loss and
        the (real) tokens this process read.

        On out-of-memory (single process) the micro-batch is halved, accumulation doubled, and the
        same step retried, so the global batch stays as the recipe wrote it.
        """
        nonlocal micro, accum
        while True:
            step_loss = torch.zeros((), device=device)
            tokens = 0
            try:
                for batch in batches.micro_batches(step, rank, world, micro):
                    tokens += task.tokens_in(batch)
                    batch = tuple(t.to(device, non_blocking=True) for t in batch)
                    with accelerator.accumulate(model):
                        loss = task.loss(model, batch, accelerator)
                        accelerator.backward(loss + cfg.l1 * l1_penalty(model) if cfg.l1 else loss)
                    step_loss += loss.detach()
                return step_loss, tokens
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                smaller = micro // 2
                if world > 1 or smaller < 1 or cfg.batch_size % (smaller * world):
                    why = "several processes cannot agree on a retry" if world > 1 else "no smaller micro-batch divides the batch"
                    raise LlmctlError(
                        f"out of memory at step {step + 1} with micro_batch_size {micro} ({why}); "
                        "lower train.micro_batch_size or the model size.",
                        kind="oom", exit_code=EXIT_FAILURE,
                    ) from None
                del e
                optimizer.zero_grad(set_to_none=True)
                accelerator.step = 0
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                micro, accum = smaller, cfg.batch_size // (smaller * world)
                accelerator.gradient_accumulation_steps = accum
                metrics.append({"step": step + 1, "event": "out_of_memory", "micro_batch_size": micro, "accumulation": accum})
                cb.on_message(f"out of memory at step {step + 1}: retrying with micro-batch {micro} x {accum} accumulation")

    cb.on_start(
        {
            "run_dir": str(rd.path),
            "start_step": start_step,
            "max_steps": max_steps,
            "parameters": plan.parameters if plan is not None else sum(p.numel() for p in model.parameters()),
            "trainable_parameters": trainable,
            "task": task.kind,
            "processes": world,
            "device": str(device),
            "precision": cfg.precision,
            "strategy": cfg.strategy,
            "micro_batch_size": micro,
            "micro_batch_auto": cfg.micro_batch_size == "auto",
            "accumulation": accum,
            "batch_size": cfg.batch_size,
            "context_length": recipe.model.context_length,
            "plan": plan,
            **task.info(),
        }
    )
    if eval_note:
        cb.on_message(eval_note)
    truncated = task.info().get("truncated_examples")
    if truncated:
        cb.on_message(f"{truncated:,} train conversations are longer than model.context_length + 1 "
                      f"({recipe.model.context_length + 1} tokens): each is cut there")
    if adapters:
        record = provenance_base["adapter"]
        cb.on_message(
            f"LoRA rank {cfg.lora.rank} (alpha {cfg.lora.alpha:g}) on {len(adapters)} layers "
            f"({', '.join(cfg.lora.targets)}): {trainable:,} trainable parameters, "
            f"{100 * trainable / max(record['base_parameters'], 1):.2f}% of the frozen {record['base_parameters']:,}"
        )

    model.train()
    step = start_step
    last_loss: float | None = None
    last_val: float | None = None
    stopped_early = False
    window_t0, window_tokens, window_micro = time.perf_counter(), 0, 0
    run_t0 = time.perf_counter() - state["elapsed_s"]
    loss_sum = torch.zeros((), device=device)
    while step < max_steps:
        step_loss, step_tokens = accumulate_gradients(step)
        if task.kind == "lm":  # every window is full: the same count on every process
            step_tokens = cfg.batch_size * recipe.model.context_length
        elif world > 1:
            step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=device), reduction="sum"))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        lr_of_step = optimizer.param_groups[0]["lr"]
        # One host sync per step: the norm of the synced gradients is the same on every process,
        # so all of them take the same decision.
        finite = math.isfinite(float(grad_norm))
        if finite:
            optimizer.step()
            for p, keep in sparsity_masks:
                p.data.mul_(keep)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        state["tokens"] += step_tokens
        state["examples"] = (state.get("examples") or 0) + cfg.batch_size
        window_tokens += step_tokens
        if not finite:
            state["skipped"] += 1
            if state["skipped"] > cfg.skip_nonfinite:
                raise LlmctlError(_nonfinite_hint(step, last_checkpoint, cfg.precision), kind="nonfinite", exit_code=EXIT_FAILURE)
            metrics.append({"step": step, "event": "nonfinite_skipped", "skipped": state["skipped"]})
            cb.on_message(f"step {step}: loss or gradient is NaN/inf; batch skipped ({state['skipped']} of at most {cfg.skip_nonfinite})")
        else:
            loss_sum += step_loss
            window_micro += accum
        row = None
        if step % cfg.log_every == 0 or step == max_steps:
            last_loss = float(accelerator.reduce(loss_sum, reduction="mean")) / max(window_micro, 1)
            now = time.perf_counter()
            row = {
                "step": step,
                "tokens": state["tokens"],
                "loss": round(last_loss, 6),
                "lr": lr_of_step,
                "grad_norm": round(float(grad_norm), 6),
                "tokens_per_s": round(window_tokens / max(now - window_t0, 1e-9), 1),
                "elapsed_s": round(now - run_t0, 3),
            }
            if task.kind != "lm":
                row["examples"] = state["examples"]
            metrics.append(row)
            if cfg.log_with:
                accelerator.log(tracker_row(row), step=step)
            loss_sum.zero_()
            window_t0, window_tokens, window_micro = now, 0, 0
        cb.on_step(step, row)

        if step % eval_every == 0 or step == max_steps:
            figures = evaluate()
            last_val = figures["val_loss"]
            eval_row = {"step": step, "tokens": state["tokens"], **figures,
                        "elapsed_s": round(time.perf_counter() - run_t0, 3)}
            if task.kind != "lm":
                eval_row["examples"] = state["examples"]
            value = figures[cfg.monitor]
            best = state["best_monitor"] if state["best_monitor"] is not None else (
                state["best_val_loss"] if cfg.monitor == "val_loss" else None)  # checkpoints older than best_monitor
            if monitor_is_better(cfg.monitor, value, best, cfg.min_delta):
                state.update(best_monitor=value, best_val_loss=last_val, best_step=step, bad_evals=0)
                save_model_to(rd.best.path, step, figures)
            else:
                state["bad_evals"] += 1
            eval_row["best_val_loss"] = round(state["best_val_loss"], 6)
            if cfg.monitor != "val_loss":
                eval_row[f"best_{cfg.monitor}"] = round(state["best_monitor"], 6)
            metrics.append(eval_row)
            if cfg.log_with:
                accelerator.log(tracker_row(eval_row), step=step)
            cb.on_eval(eval_row)
            if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
                stopped_early = True
                cb.on_message(
                    f"early stopping at step {step}: {cfg.monitor} has not improved by {cfg.min_delta} "
                    f"for {cfg.patience} evaluations (best {state['best_monitor']:.4f} at step {state['best_step']})"
                )

        if step % cfg.checkpoint_every == 0 or step == max_steps or stopped_early:
            state["elapsed_s"] = time.perf_counter() - run_t0
            save_checkpoint(accelerator, rd, step, state, cfg.keep_checkpoints)
            last_checkpoint = step
        if stopped_early:
            break

    state["elapsed_s"] = time.perf_counter() - run_t0
    final_metrics = {"loss": last_loss, "val_loss": last_val, "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
                     f"best_{cfg.monitor}": state["best_monitor"]}
    if cfg.keep_best and rd.best.path.is_dir():
        if main:
            copy_model_dir(rd.best.path, rd.model.path)
    else:
        save_model_to(rd.model.path, step, final_metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        run_dir=rd.path,
        model_dir=rd.model.path,
        step=step,
        tokens=state["tokens"],
        loss=last_loss,
        val_loss=last_val,
        best_val_loss=state["best_val_loss"],
        best_step=state["best_step"],
        stopped_early=stopped_early,
        elapsed_s=state["elapsed_s"],
        extra={"micro_batch_size": micro, "accumulation": accum, "eval_every": eval_every, "skipped_nonfinite": state["skipped"],
               "monitor": cfg.monitor, "best_monitor": state["best_monitor"], "task": task.kind,
               **({"examples": state["examples"]} if task.kind != "lm" else {})},
    )
