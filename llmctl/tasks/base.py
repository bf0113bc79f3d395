"""What a task is: the part of every stage that differs between language modelling, classification and
instruction tuning, behind one interface the stages call.

A task is a package under `llmctl/tasks/` with one module per stage it shapes. The stages (prepare, train,
eval, compress, export, serve, report) ask the registry for the task (`task_named(recipe.data.task)`, or
`task_of(dir)` from the `task` key every artifact records) and call the stage module's functions; they
never ask "is this a classifier". A task may reuse another's module for a stage where they do not differ
(an instruction-tuned model is evaluated, exported and served as a language model).

Stage modules are imported when first asked for, so naming a task costs nothing (they import torch).
What each stage module provides is its protocol below; the shared skeletons they call (building a
dataset dir, tracing an ONNX graph, opening an ORT session, saving a compressed dir) live in neutral
modules of the stage's own package, never in another task's module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Mapping

STAGES = ("data", "training", "evaluation", "compression", "export", "serving", "reporting")


@dataclass(frozen=True)
class Task:
    """One task: its name (the recipe's `data.task` and every artifact's `task` key), a line saying what it
    is, and the module of each stage (`stage -> dotted module path`)."""

    name: str
    summary: str
    modules: Mapping[str, str] = field(default_factory=dict)

    def stage(self, stage: str) -> ModuleType:
        """The module of `stage` (one of STAGES) for this task, imported now."""
        if stage not in self.modules:
            from llmctl.errors import LlmctlError

            raise LlmctlError(f"the {self.name} task has no {stage} stage.")
        return importlib.import_module(self.modules[stage])

    @property
    def data(self) -> ModuleType:
        """`prepare(data, out_dir, *, seed, force, on_progress, init_from) -> PrepareResult` writes the
        dataset dir (through data.dataset_builder); `open_dataset(path)` reads one back; `summary(meta) ->
        dict` is what `prepare --json` prints, `describe(path, summary) -> list[str]` the lines people read."""
        return self.stage("data")

    @property
    def training(self) -> ModuleType:
        """`TrainingData(recipe)`, a `training.task_data.TaskData`: the trainer's view of the dataset (the model
        shape, batches, the loss of a micro-batch, the evaluator of the val split, what the logs count);
        `planned_shape(recipe, vocab_size)`: the GPTConfig the memory planner plans, or None."""
        return self.stage("training")

    @property
    def evaluation(self) -> ModuleType:
        """`evaluate(request, progress) -> EvalOutcome` scores one model, its gates judged; `compare(request,
        progress) -> EvalOutcome` profiles several; `refuse_options(request)` refuses what the task does not
        take (llmctl.evaluation.request: EvalRequest, EvalOutcome)."""
        return self.stage("evaluation")

    @property
    def compression(self) -> ModuleType:
        """`compress(loaded, model_dir, out_dir, options, *, data, measure_speed, progress) -> report` prunes and
        quantizes a model dir of this task (through compression.save); `report_rows(report)` and
        `report_notes(report)` are the before/after table and the not-measured lines `compress` prints."""
        return self.stage("compression")

    @property
    def export(self) -> ModuleType:
        """`export(loaded, out_dir, options, *, data, progress) -> ExportReport` writes the format the export
        section names (`export_onnx`: the ONNX graph, its wrapper and its parity check, through
        export.onnx_export); `open_onnx(export_dir, file, *, spin_threads)` runs an export dir's graph."""
        return self.stage("export")

    @property
    def serving(self) -> ModuleType:
        """Before listening: `describe(config, tokenizer, where, what) -> ServedShape`, `refuse_options(options,
        info)`, `state_fields(info, options)`, `kind_note(info)`, `ROUTES`; once loaded, `start_runner(model,
        state, options) -> (Runner, detail)`; the app mounts `router(state)` (its POST `ENDPOINTS`) and asks
        `model_card(state)` and `wrong_endpoint(state, path)` (llmctl.serving: model_info, runner, state)."""
        return self.stage("serving")

    @property
    def reporting(self) -> ModuleType:
        """`RUN` (reporting.panels.RunPanels): the figures and plots `llmctl report` adds for a run of this task;
        `COMPARE` (ComparePanels): the quality axes and table of a compare of its models."""
        return self.stage("reporting")
