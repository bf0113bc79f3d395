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
        target = run_dir or Path("runs") / resolved.name
        device_ids = parse_devices(devices) if devices else resolved.train.devices
        if device_ids is not None and not launched():
            check_devices(device_ids)
            _pin_devices(device_ids)
        check_strategy(resolved.train.strategy)
        if plan:
            _print_plan(resolved, nproc or 1, json_out)
            return

        from llmctl.training.trainer import check_run_dir

        check_run_dir(target, resume=resume, overwrite=overwrite, recipe=resolved)
        from llmctl.training.trackers import check_trackers

        check_trackers(resolved.train.log_with)  # before preparing a data set the run would then refuse
        if not launched() and ((nproc or 1) > 1 or accelerate_config is not None):
            raise typer.Exit(_launch(recipe, overrides or [], resolved, run_dir, resume, overwrite, nproc, accelerate_config, device_ids, json_out))

        from llmctl.cli.prepare import run_prepare
        from llmctl.cli.progress import TrainProgress
        from llmctl.training.trainer import train

        if not launched():
            run_prepare(resolved)  # a launched run's parent prepared it once, before starting workers
        from llmctl.tuning.distributed import RankZeroTrialReporter, TrialStopped, trial_context

        progress = TrainProgress()
        context = trial_context()
        callbacks = RankZeroTrialReporter(context, progress) if context else progress
        try:
            result = train(resolved, target, resume=resume, overwrite=overwrite, callbacks=callbacks)
        except TrialStopped as stopped:
            say(str(stopped))
            return
        finally:
            progress.close()
        monitor, best_value = result.extra.get("monitor", "val_loss"), result.extra.get("best_monitor")
        best = f", best {monitor.replace('_', ' ')} {best_value:.4f} at step {result.best_step}" if best_value is not None else ""
        if result.extra.get("task", "lm") == "lm":
            say(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s{best}")
            say(f"model: {result.model_dir}  (next: llmctl eval {result.model_dir} --prompt \"def \")")
        else:
            say(f"done: {result.step} steps, {result.extra['examples']:,} examples in {result.elapsed_s:.0f} s{best}")
            say(f"model: {result.model_dir}  (next: llmctl eval {result.model_dir})")
        if json_out:
            print_json(
                {
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
                }
            )


def _pin_devices(ids: list[int]) -> None:
    """Make only these GPUs visible to this process (before CUDA starts) and its workers."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))


def _launch(recipe, overrides, resolved, run_dir, resume, overwrite, nproc, accelerate_config, device_ids, json_out) -> int:
    """Prepare once here, then run `llmctl train` in every process through `accelerate launch`."""
    from llmctl.cli.prepare import run_prepare
    from llmctl.training.launch import check_accelerate_config, launch_command, run_launched
    from llmctl.training.trainer import check_batch_split

    processes = check_accelerate_config(accelerate_config) if accelerate_config is not None else None
    if device_ids is not None and nproc is not None and nproc > len(device_ids):
        from llmctl.errors import LlmctlError

        raise LlmctlError(f"--nproc {nproc} needs {nproc} GPUs, but --devices names {len(device_ids)}.")
    check_batch_split(resolved.train, nproc or processes or 1)  # once, here, not in every worker
    run_prepare(resolved)
    args = [str(recipe), *overrides]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    args += ["--resume"] * resume + ["--overwrite"] * overwrite + ["--json"] * json_out
    cmd = launch_command(args, nproc=nproc, accelerate_config=accelerate_config, fsdp=resolved.train.strategy == "fsdp")
    say(f"launching {nproc or 'the configured number of'} processes through accelerate launch")
    return run_launched(cmd, device_ids)


def _planned_vocab(resolved) -> int:
    """The vocabulary the run will have: the prepared dataset's, a reused tokenizer's, or data.vocab_size."""
    from llmctl.artifacts import DatasetDir

    dataset = DatasetDir(resolved.data_dir())
    if dataset.exists():
        return int(dataset.read_meta()["vocab_size"])
    if resolved.data.tokenizer:
        from llmctl.data.tokenizer import load_tokenizer

        return load_tokenizer(Path(resolved.data.tokenizer)).get_vocab_size()
    return resolved.data.vocab_size


def _print_plan(resolved, processes: int, json_out: bool) -> None:
    from accelerate import PartialState

    from llmctl.cli.progress import plan_table
    from llmctl.training.trainer import resolve_micro_batch

    device = "cuda:0" if PartialState().device.type == "cuda" else "cpu"
    micro, plan = resolve_micro_batch(resolved, processes, device, _planned_vocab(resolved))
    if json_out:
        print_json({"plan": plan.to_dict(), "micro_batch_size": micro, "processes": processes})
    else:
        from llmctl.cli.output import out_console

        out_console.print(plan_table(plan))
