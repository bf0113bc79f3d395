"""`llmctl train`: train a recipe's model into a run dir, in one process or several."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_override, complete_recipe_file
from llmctl.cli.output import print_json, reporting_errors, say, silence_unless_main

EPILOG = (
    "Examples: llmctl train my.yaml train.lr=1e-3 model.n_layer=2  |  llmctl train my.yaml --nproc 2  |  "
    "llmctl train my.yaml --plan"
)


def train_cli(
    recipe: Path = typer.Argument(..., help="Recipe file.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="section.key=value overrides.", show_default=False, autocompletion=complete_override
    ),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run dir (default runs/<run.name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run dir's newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run dir's checkpoints and start over."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Processes to train with: one per GPU, or gloo processes on CPU."
    ),
    accelerate_config: Optional[Path] = typer.Option(
        None, "--accelerate-config", help="An Accelerate config file (multi-GPU, multi-node, FSDP, DeepSpeed)."
    ),
    devices: Optional[str] = typer.Option(
        None, "--devices", help="GPU indices to use, e.g. 0,2; other GPUs are not touched (overrides train.devices)."
    ),
    plan: bool = typer.Option(False, "--plan", help="Print the memory plan and exit without training."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (final figures) on stdout."),
) -> None:
    """Train the recipe's model (preparing its dataset first if needed); writes runs/<name>/."""
    from llmctl.training.launch import launched

    silence_unless_main()
    with reporting_errors(json_out):
        from llmctl.config import load_recipe
        from llmctl.training.launch import check_devices, check_strategy, parse_devices

        resolved = load_recipe(recipe, overrides or [])
        device_ids = parse_devices(devices) if devices else resolved.train.devices
        if device_ids is not None and not launched():
            check_devices(device_ids)
            _pin_devices(device_ids)
        check_strategy(resolved.train.strategy)
        if plan:
            _print_plan(resolved, nproc or 1, json_out)
            return

        from llmctl.cli.prepare import run_prepare
        from llmctl.training.run import launch_run, train_run

        if not launched() and ((nproc or 1) > 1 or accelerate_config is not None):
            raise typer.Exit(launch_run(
                resolved, recipe, overrides or [], run_dir, resume=resume, overwrite=overwrite, nproc=nproc,
                accelerate_config=accelerate_config, devices=device_ids, json_out=json_out, prepare=run_prepare,
                on_message=say,
            ))
        from llmctl.cli.progress import TrainProgress
        from llmctl.tuning.distributed import RankZeroTrialReporter, TrialStopped, trial_context

        progress = TrainProgress()
        context = trial_context()
        callbacks = RankZeroTrialReporter(context, progress) if context else progress
        try:
            # A launched run's parent prepared the dataset once, before starting the workers.
            result = train_run(resolved, run_dir or Path("runs") / resolved.name, resume=resume, overwrite=overwrite,
                               callbacks=callbacks, prepare=None if launched() else run_prepare)
        except TrialStopped as stopped:
            say(str(stopped))
            return
        finally:
            progress.close()
        _print_result(result, json_out)


def _print_result(result, json_out: bool) -> None:
    monitor, best_value = result.extra.get("monitor", "val_loss"), result.extra.get("best_monitor")
    best = f", best {monitor.replace('_', ' ')} {best_value:.4f} at step {result.best_step}" if best_value is not None else ""
    if "examples" in result.extra:  # a task that counts examples (classification, instruct)
        say(f"done: {result.step} steps, {result.extra['examples']:,} examples in {result.elapsed_s:.0f} s{best}")
        say(f"model: {result.model_dir}  (next: llmctl eval {result.model_dir})")
    else:
        say(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s{best}")
        say(f"model: {result.model_dir}  (next: llmctl eval {result.model_dir} --prompt \"def \")")
    if json_out:
        print_json({
            "run_dir": str(result.run_dir),
            "model_dir": str(result.model_dir),
            "step": result.step,
            "tokens": result.tokens,
            "loss": result.loss,
            "val_loss": result.val_loss,
            "best_val_loss": result.best_val_loss,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "elapsed_s": round(result.elapsed_s, 3),
            **result.extra,
        })


def _pin_devices(ids: list[int]) -> None:
    """Make only these GPUs visible to this process (before CUDA starts) and its workers."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))


def _print_plan(resolved, processes: int, json_out: bool) -> None:
    from llmctl.training.run import memory_plan

    micro, plan = memory_plan(resolved, processes)
    if json_out:
        print_json({"plan": plan.to_dict() if plan is not None else None, "micro_batch_size": micro, "processes": processes})
    elif plan is not None:
        from llmctl.cli.output import out_console
        from llmctl.cli.progress import plan_table

        out_console.print(plan_table(plan))
    else:
        say(f"micro-batch {micro} x {processes} process(es): data.task {resolved.data.task} has no memory plan")
