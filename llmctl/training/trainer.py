"""The training engine: one Accelerate loop for every task and model family, one process or many.

`Trainer` has the torchtune recipe's shape: `setup()` runs `setup_processes`, `setup_model` (build,
init_from, LoRA, sparsity masks, `accelerator.prepare`: where parallelism plugs in), `setup_data`, the
restore of a resumed run and the opening of the run dir; `train()` is the loop over `train_step`,
`evaluate` (early stopping beside it) and `save_checkpoint`; `save_model` writes a model dir and
`cleanup` ends the run. What differs between tasks comes from the task's training module
(`task_named(recipe.data.task).training`). It knows nothing of typer or rich: progress goes to a
`TrainCallbacks` object.
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
from llmctl.artifacts import RunDir, WriteFailed, remove_path, write_atomic, writing
from llmctl.config.loader import recipe_to_yaml
from llmctl.config.schema import Recipe
from llmctl.errors import EXIT_FAILURE, LlmctlError
from llmctl.training.state import EarlyStopping, TrainState


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


@dataclass
class StepFigures:
    """One optimizer step: its summed micro-batch loss (None when skipped as NaN/inf), tokens, norm and lr."""

    loss: Any
    tokens: int
    grad_norm: float
    lr: float


class LogWindow:
    """The steps since the last metrics row: their loss summed on the device (read once per row), the
    micro-batches it sums, the tokens they read and when the window opened."""

    def __init__(self, device: Any):
        import torch

        self.loss = torch.zeros((), device=device)
        self.micro, self.tokens, self.t0 = 0, 0, time.perf_counter()

    def close(self, now: float) -> None:
        self.loss.zero_()
        self.micro, self.tokens, self.t0 = 0, 0, now


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
    from llmctl.training.run_checks import resume_remedy

    try:
        trainer = Trainer(recipe, Path(run_dir), resume=resume, overwrite=overwrite, callbacks=callbacks)
        trainer.setup()
        result = trainer.train()
        trainer.cleanup()
        return result
    except WriteFailed as failure:
        raise failure.with_remedy(resume_remedy(RunDir(Path(run_dir)), failure)) from None


class Trainer:
    """One training run of a recipe into a run dir."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
                 callbacks: TrainCallbacks | None = None):
        """Check the run before any work (run dir, trackers, precision, a resumed run's model) and open the
        task's training data."""
        from llmctl.tasks import task_named
        from llmctl.training.run_checks import check_precision, check_run_dir, check_same_model
        from llmctl.training.steps import scaled_eval_every, steps_for_epochs

        # Accelerate warns on every save that tied embeddings are stored once; that is intended.
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
        self.recipe, self.cfg = recipe, recipe.train
        self.callbacks = callbacks or TrainCallbacks()
        self.overwrite = overwrite
        if self.cfg.log_with:
            from llmctl.training.trackers import check_trackers

            check_trackers(self.cfg.log_with)
        self.rd = RunDir(Path(run_dir))
        self.resume_from = check_run_dir(self.rd.path, resume=resume, overwrite=overwrite, recipe=recipe)
        if self.resume_from:
            check_same_model(self.rd, recipe)
        self.mixed_precision = check_precision(self.cfg.precision)
        self.task = task_named(recipe.data.task)
        self.data = self.task.training.TrainingData(recipe)
        examples = self.data.train_examples()
        self.max_steps = steps_for_epochs(self.cfg.epochs, examples, self.cfg.batch_size) if self.cfg.epochs else self.cfg.max_steps
        self.eval_every, self.eval_note = scaled_eval_every(self.cfg, self.max_steps,
                                                            steps_for_epochs(1, examples, self.cfg.batch_size))
        self.adapters: list[str] = []
        self.base_fingerprint: str | None = None

    # --- setup ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step, in the order that keeps runs reproducible and resumable."""
        self.setup_processes()
        self.setup_model()
        self.setup_data()
        self.restore()
        self.open_run_dir()

    def setup_processes(self) -> None:
        """The process group, the micro-batch (and its memory plan) and the Accelerator stepping with it."""
        from accelerate import Accelerator, PartialState

        from llmctl.training.launch import cpu_workers
        from llmctl.training.micro_batch import resolve_micro_batch
        from llmctl.training.run_checks import check_batch_split

        cfg = self.cfg
        distributed = PartialState(cpu=cpu_workers())
        self.world = distributed.num_processes
        self.micro, self.plan = resolve_micro_batch(self.recipe, self.world, str(distributed.device), self.data.vocab_size)
        check_batch_split(cfg.model_copy(update={"micro_batch_size": self.micro}), self.world)
        self.accelerator = Accelerator(
            cpu=cpu_workers(),
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=cfg.batch_size // (self.micro * self.world),
            step_scheduler_with_optimizer=False,
            dynamo_backend="inductor" if cfg.compile else "no",
            log_with=list(cfg.log_with) or None,
            project_dir=self.rd.path if cfg.log_with else None,
        )
        self.rank, self.main, self.device = self.accelerator.process_index, self.accelerator.is_main_process, self.accelerator.device

    @property
    def accumulation(self) -> int:
        return self.accelerator.gradient_accumulation_steps

    def setup_model(self) -> None:
        """Build the model (seeded) from the task's shape, start it from model.init_from, add LoRA adapters,
        build the optimizer and schedule and hand them to Accelerate; trained matrices that start with zeros
        (a pruned model under train.keep_sparsity) get masks that keep those zeros."""
        from accelerate.utils import set_seed

        from llmctl.models import build_model
        from llmctl.training.optim import build_optimizer, build_schedule

        cfg = self.cfg
        set_seed(self.recipe.run.seed)
        model = build_model({**self.data.model_shape().to_dict(), "task": self.task.name})
        # A LoRA checkpoint holds the adapters alone: the frozen base comes from init_from on resume too.
        if self.recipe.model.init_from and (not self.resume_from or cfg.lora):
            from llmctl.models.init_from import load_weights_into

            load_weights_into(model, Path(self.recipe.model.init_from))
        if cfg.lora:
            from llmctl.training.lora import apply_lora, base_fingerprint

            self.base_fingerprint = base_fingerprint(model)
            self.adapters = apply_lora(model, cfg.lora)
        model = self.parallelize(model)
        optimizer = build_optimizer(model, cfg)
        self.scheduler = build_schedule(optimizer, cfg)
        if cfg.keep_sparsity and cfg.strategy == "fsdp" and self.world > 1:
            raise LlmctlError("train.keep_sparsity works with strategy ddp only (FSDP flattens the weight matrices).")
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.sparsity_masks = [
            (p, p.ne(0).to(p.dtype)) for p in self.accelerator.unwrap_model(self.model).parameters()
            if cfg.keep_sparsity and p.requires_grad and p.dim() >= 2 and not p.all()
        ]
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.adapter_keys = None
        if self.adapters:
            from llmctl.training.checkpoints import keep_adapters_only
            from llmctl.training.lora import is_adapter_key

            keep_adapters_only(self.accelerator)
            self.adapter_keys = {k for k in self.model.state_dict() if is_adapter_key(k)}

    def parallelize(self, model: Any) -> Any:
        """Where model parallelism applies to the built model before its optimizer exists (a DeviceMesh from
        the recipe, FSDP2 sharding, tensor-parallel plans, pipeline stages); data parallelism (DDP) is
        Accelerate's `prepare`, so today the model is returned as it is."""
        return model

    def setup_data(self) -> None:
        """The train batches, the CUDA memory cap, the micro-batch a real step fits (auto, on CUDA) and the
        val evaluator."""
        cfg = self.cfg
        self.batches = self.data.batches(cfg.batch_size, self.recipe.run.seed)
        if cfg.max_memory is not None and self.device.type == "cuda":
            from llmctl.training.micro_batch import cap_cuda_memory
            from llmctl.units import parse_memory

            cap_cuda_memory(self.device, parse_memory(cfg.max_memory))
        probe = self.data.probe_loss(self.batches, self.accelerator) if self.device.type == "cuda" else None
        if cfg.micro_batch_size == "auto" and probe is not None:
            from llmctl.training.micro_batch import probe_on_gpu

            self.micro, self.plan = probe_on_gpu(self.accelerator, self.model, probe, self.recipe, self.world, self.micro, self.plan)
            self.accelerator.gradient_accumulation_steps = cfg.batch_size // (self.micro * self.world)
        self.evaluate_on_val = self.data.make_evaluator(self.micro, self.rank, self.world)

    def restore(self) -> None:
        """The metrics log and the state: a fresh one, or a resumed checkpoint's (loaded before anything is
        written, so a refused checkpoint leaves the run dir as it was)."""
        from llmctl.training.checkpoints import MetricsLog, load_checkpoint

        self.metrics = MetricsLog(self.rd.metrics, enabled=self.main)
        self.state = TrainState()
        if self.resume_from:
            saved = load_checkpoint(self.accelerator, self.resume_from[1], self.adapter_keys)
            if self.adapters and saved.get("lora_base") not in (None, self.base_fingerprint):
                raise LlmctlError(
                    f"--resume: the base weights ({self.recipe.model.init_from or 'the seed'}'s) are not those the adapters of "
                    f"{self.resume_from[1]} were trained on; restore that base model dir, or pass --overwrite to start over."
                )
            self.state = TrainState.from_checkpoint(saved)
            self.metrics.truncate_after(self.state.step)
        self.state.lora_base = self.base_fingerprint if self.adapters else None
        self.early_stopping = EarlyStopping(self.cfg, self.state)
        self.last_checkpoint = self.state.step or None

    def open_run_dir(self) -> None:
        """Clear what a killed run left half-written (and, with --overwrite, the old run), write recipe.yaml,
        start the trackers."""
        rd, cfg = self.rd, self.cfg
        tracker_dir = rd.path / (self.recipe.run.name or rd.path.name)  # where Accelerate's trackers write (TensorBoard events)
        if self.main:
            stale = rd.stale_temporaries()  # what a killed run left half-written (a copy of model/, a checkpoint)
            for path in stale:
                remove_path(path)
            if stale:
                self.callbacks.on_message(
                    f"removed {len(stale)} half-written temporary file(s) an interrupted run left in {rd.path}: "
                    f"{', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''}")
            if self.overwrite and rd.path.exists():
                for child in (rd.checkpoints, rd.model.path, tracker_dir):
                    shutil.rmtree(child, ignore_errors=True)
            if not self.resume_from:
                rd.metrics.unlink(missing_ok=True)
            with writing(f"the run dir {rd.path}", rd.path):
                rd.path.mkdir(parents=True, exist_ok=True)
                write_atomic(rd.recipe, recipe_to_yaml(self.recipe))
        self.accelerator.wait_for_everyone()
        if cfg.log_with:  # trackers write on the main process only (Accelerate's on_main_process)
            from llmctl.training.trackers import flat_config

            # On resume TensorBoard drops the events logged after the checkpoint, as metrics.jsonl is cut back.
            purge = {"tensorboard": {"purge_step": self.state.step + 1}} if self.state.step else {}
            self.accelerator.init_trackers(tracker_dir.name, config=flat_config(self.recipe.model_dump(mode="json")),
                                           init_kwargs=purge)
        self.provenance = self._provenance()

    def _provenance(self) -> dict[str, Any]:
        """What every model dir this run writes records in llmctl.json, beside its step and figures."""
        record = {
            "llmctl_version": __version__,
            "recipe": self.recipe.model_dump(mode="json"),
            "dataset": {"dir": str(Path(self.data.dataset.path).resolve()), "fingerprint": self.data.fingerprint},
            "run_dir": str(self.rd.path.resolve()),
        }
        if self.adapters:
            from llmctl.training.lora import adapter_record

            trainable, frozen = self._parameters(trained=True), self._parameters(trained=False)
            record["adapter"] = adapter_record(self.cfg.lora, self.adapters, trainable, frozen, self.recipe.model.init_from)
        return record

    def _parameters(self, trained: bool) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad == trained)

    # --- the loop ---------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Step until max_steps (or early stopping): log every log_every steps, evaluate every eval_every,
        checkpoint every checkpoint_every, and all three at the last step."""
        cfg, state = self.cfg, self.state
        self._announce()
        self.model.train()
        self.run_t0 = time.perf_counter() - state.elapsed_s
        window = LogWindow(self.device)
        self.last_loss: float | None = None
        self.last_val: float | None = None
        stopped = False
        while state.step < self.max_steps and not stopped:
            figures = self.train_step()
            window.tokens += figures.tokens
            if figures.loss is not None:
                window.loss += figures.loss
                window.micro += self.accumulation
            row = self._log_row(window, figures) if self._due(cfg.log_every) else None
            self.callbacks.on_step(state.step, row)
            if self._due(self.eval_every):
                stopped = self.evaluate()
            if self._due(cfg.checkpoint_every) or stopped:
                self.save_checkpoint()
        return self._finish(stopped)

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.max_steps

    def train_step(self) -> StepFigures:
        """One optimizer step: forward and backward over this process's micro-batches, the clipped norm of
        the synced gradients, the update (skipped, up to train.skip_nonfinite times, when that norm is
        NaN/inf), the schedule."""
        import torch

        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        loss, tokens = self._accumulate_gradients(state.step)
        fixed = self.data.step_tokens(cfg.batch_size)
        if fixed is not None:
            tokens = fixed
        elif self.world > 1:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=self.device), reduction="sum"))
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        # One host sync per step: the norm of the synced gradients is the same on every process,
        # so all of them take the same decision.
        finite = math.isfinite(float(grad_norm))
        if finite:
            self.optimizer.step()
            for p, keep in self.sparsity_masks:
                p.data.mul_(keep)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        state.step += 1
        state.tokens += tokens
        state.examples = (state.examples or 0) + cfg.batch_size
        if not finite:
            self._skip_nonfinite()
        return StepFigures(loss if finite else None, tokens, float(grad_norm), lr)

    def _accumulate_gradients(self, step: int) -> tuple[Any, int]:
        """Forward and backward over this process's micro-batches of `step`; returns the summed loss and
        the (real) tokens this process read.

        On out-of-memory (single process) the micro-batch is halved, accumulation doubled, and the
        same step retried, so the global batch stays as the recipe wrote it.
        """
        import torch

        from llmctl.training.micro_batch import is_out_of_memory
        from llmctl.training.optim import l1_penalty

        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        while True:
            step_loss = torch.zeros((), device=self.device)
            tokens = 0
            try:
                for batch in self.batches.micro_batches(step, self.rank, self.world, self.micro):
                    tokens += self.data.tokens_in(batch)
                    batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                    with accelerator.accumulate(model):
                        loss = self.data.loss(model, batch, accelerator)
                        accelerator.backward(loss + cfg.l1 * l1_penalty(model) if cfg.l1 else loss)
                    step_loss += loss.detach()
                return step_loss, tokens
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                del e
                self._halve_micro_batch(step)

    def _halve_micro_batch(self, step: int) -> None:
        import torch

        cfg, micro = self.cfg, self.micro
        smaller = micro // 2
        if self.world > 1 or smaller < 1 or cfg.batch_size % (smaller * self.world):
            why = "several processes cannot agree on a retry" if self.world > 1 else "no smaller micro-batch divides the batch"
            raise LlmctlError(
                f"out of memory at step {step + 1} with micro_batch_size {micro} ({why}); "
                "lower train.micro_batch_size or the model size.",
                kind="oom", exit_code=EXIT_FAILURE,
            ) from None
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.step = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.micro, accum = smaller, cfg.batch_size // (smaller * self.world)
        self.accelerator.gradient_accumulation_steps = accum
        self.metrics.append({"step": step + 1, "event": "out_of_memory", "micro_batch_size": self.micro, "accumulation": accum})
        self.callbacks.on_message(f"out of memory at step {step + 1}: retrying with micro-batch {self.micro} x {accum} accumulation")

    def _skip_nonfinite(self) -> None:
        cfg, state = self.cfg, self.state
        state.skipped += 1
        if state.skipped > cfg.skip_nonfinite:
            where = (f"the last good checkpoint is step-{self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written yet")
            fp16 = "; fp16 overflows easily: try bf16 or fp32" if cfg.precision == "fp16" else ""
            raise LlmctlError(
                f"loss or gradient became NaN/inf at step {state.step}; {where}. Lower train.lr, set train.grad_clip "
                f"(e.g. 1.0), add warmup_steps{fp16}, or set train.skip_nonfinite: N to skip such batches.",
                kind="nonfinite", exit_code=EXIT_FAILURE,
            )
        self.metrics.append({"step": state.step, "event": "nonfinite_skipped", "skipped": state.skipped})
        self.callbacks.on_message(
            f"step {state.step}: loss or gradient is NaN/inf; batch skipped ({state.skipped} of at most {cfg.skip_nonfinite})")

    def _log_row(self, window: LogWindow, figures: StepFigures) -> dict[str, Any]:
        """The metrics.jsonl row of the window that ends at this step (the mean loss over its processes)."""
        self.last_loss = float(self.accelerator.reduce(window.loss, reduction="mean")) / max(window.micro, 1)
        now = time.perf_counter()
        row = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": round(self.last_loss, 6),
            "lr": figures.lr,
            "grad_norm": round(figures.grad_norm, 6),
            "tokens_per_s": round(window.tokens / max(now - window.t0, 1e-9), 1),
            "elapsed_s": round(now - self.run_t0, 3),
        }
        if self.data.counts_examples:
            row["examples"] = self.state.examples
        self._record(row)
        window.close(now)
        return row

    def _record(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row, to the trackers too."""
        self.metrics.append(row)
        if self.cfg.log_with:
            from llmctl.training.trackers import tracker_row

            self.accelerator.log(tracker_row(row), step=self.state.step)

    def evaluate(self) -> bool:
        """Score the val split, keep the best model apart and log the row; True when early stopping ends the run."""
        step = self.state.step
        self.model.eval()
        figures = self.evaluate_on_val(self.model, self.accelerator)
        self.model.train()
        self.last_val = figures["val_loss"]
        row = {"step": step, "tokens": self.state.tokens, **figures, "elapsed_s": round(time.perf_counter() - self.run_t0, 3)}
        if self.data.counts_examples:
            row["examples"] = self.state.examples
        if self.early_stopping.update(figures, step):
            self.save_model(self.rd.best.path, step, figures)
        row.update(self.early_stopping.best_figures())
        self._record(row)
        self.callbacks.on_eval(row)
        stop = self.early_stopping.stop_message(step)
        if stop:
            self.callbacks.on_message(stop)
        return stop is not None

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of every process's state at this step (the newest train.keep_checkpoints kept)."""
        from llmctl.training.checkpoints import save_checkpoint

        self.state.elapsed_s = time.perf_counter() - self.run_t0
        save_checkpoint(self.accelerator, self.rd, self.state.step, self.state.to_dict(), self.cfg.keep_checkpoints)
        self.last_checkpoint = self.state.step

    def save_model(self, dest: Path, step: int, figures: dict[str, Any]) -> None:
        """Write the model dir `dest`: every process joins (a sharded model is gathered), the main one writes.
        LoRA adapters are merged into the weights they adapt, so the model dir is a plain one."""
        from llmctl.models.model_dir import save_model_dir

        accelerator = self.accelerator
        if self.adapters:
            from llmctl.training.lora import merged_state_dict

            full_state = merged_state_dict(accelerator.unwrap_model(self.model)) if self.main else None
        else:
            full_state = accelerator.get_state_dict(self.model)
        if self.main:
            save_model_dir(
                accelerator.unwrap_model(self.model),
                dest,
                tokenizer_path=self.data.tokenizer_path,
                provenance={**self.provenance, "step": step, "tokens": self.state.tokens, "metrics": figures},
                state_dict=full_state,
                extra_config=self.data.model_config_extra(),
                task=self.task.name,
            )
        accelerator.wait_for_everyone()

    def cleanup(self) -> None:
        """End the run on every process (trackers closed)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # --- start and end ----------------------------------------------------------------------------------

    def _announce(self) -> None:
        """What the run is about to do, to the callbacks."""
        cfg, cb = self.cfg, self.callbacks
        trainable = self._parameters(trained=True)
        cb.on_start({
            "run_dir": str(self.rd.path),
            "start_step": self.state.step,
            "max_steps": self.max_steps,
            "parameters": self.plan.parameters if self.plan is not None else sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": trainable,
            "task": self.task.name,
            "processes": self.world,
            "device": str(self.device),
            "precision": cfg.precision,
            "strategy": cfg.strategy,
            "micro_batch_size": self.micro,
            "micro_batch_auto": cfg.micro_batch_size == "auto",
            "accumulation": self.accumulation,
            "batch_size": cfg.batch_size,
            "per_step": self.data.describe_step(cfg.batch_size),
            "plan": self.plan,
            **self.data.info(),
        })
        for note in ([self.eval_note] if self.eval_note else []) + self.data.notes():
            cb.on_message(note)
        if self.adapters:
            base = self.provenance["adapter"]["base_parameters"]
            cb.on_message(
                f"LoRA rank {cfg.lora.rank} (alpha {cfg.lora.alpha:g}) on {len(self.adapters)} layers "
                f"({', '.join(cfg.lora.targets)}): {trainable:,} trainable parameters, "
                f"{100 * trainable / max(base, 1):.2f}% of the frozen {base:,}"
            )

    def _finish(self, stopped_early: bool) -> TrainResult:
        """The final model/ (the best one under keep_best, else the last) and the run's figures."""
        from llmctl.models.model_dir import copy_model_dir

        cfg, state, rd = self.cfg, self.state, self.rd
        state.elapsed_s = time.perf_counter() - self.run_t0
        final_metrics = {"loss": self.last_loss, "val_loss": self.last_val, "best_val_loss": state.best_val_loss,
                         "best_step": state.best_step, f"best_{cfg.monitor}": state.best_monitor}
        if cfg.keep_best and rd.best.path.is_dir():
            if self.main:
                copy_model_dir(rd.best.path, rd.model.path)
        else:
            self.save_model(rd.model.path, state.step, final_metrics)
        extra = {"micro_batch_size": self.micro, "accumulation": self.accumulation, "eval_every": self.eval_every,
                 "skipped_nonfinite": state.skipped, "monitor": cfg.monitor, "best_monitor": state.best_monitor,
                 "task": self.task.name}
        if self.data.counts_examples:
            extra["examples"] = state.examples
        return TrainResult(
            run_dir=rd.path, model_dir=rd.model.path, step=state.step, tokens=state.tokens, loss=self.last_loss,
            val_loss=self.last_val, best_val_loss=state.best_val_loss, best_step=state.best_step,
            stopped_early=stopped_early, elapsed_s=state.elapsed_s, extra=extra,
        )
