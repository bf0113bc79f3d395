"""`llmctl train`: train a recipe's model into a run dir."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_recipe_file
from llmctl.cli.output import print_json, reporting_errors, say

EPILOG = "Example: llmctl train my.yaml train.lr=1e-3 model.n_layer=2"


def train_cli(
    recipe: Path = typer.Argument(..., help="Recipe file.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides.", show_default=False),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run dir (default runs/<run.name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run dir's newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run dir's checkpoints and start over."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (final figures) on stdout."),
) -> None:
    """Train the recipe's model (preparing its dataset first if needed); writes runs/<name>/."""
    from llmctl.config import load_recipe

    with reporting_errors(json_out):
        resolved = load_recipe(recipe, overrides or [])
        target = run_dir or Path("runs") / resolved.name

        from llmctl.training.trainer import check_run_dir

        check_run_dir(target, resume=resume, overwrite=overwrite)

        from llmctl.cli.prepare import run_prepare
        from llmctl.cli.progress import TrainProgress
        from llmctl.training.trainer import train

        run_prepare(resolved)
        progress = TrainProgress()
        try:
            result = train(resolved, target, resume=resume, overwrite=overwrite, callbacks=progress)
        finally:
            progress.close()
        best = f", best val loss {result.best_val_loss:.4f} at step {result.best_step}" if result.best_val_loss else ""
        say(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s{best}")
        say(f"model: {result.model_dir}  (next: llmctl eval {result.model_dir} --prompt \"def \")")
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
                }
            )
