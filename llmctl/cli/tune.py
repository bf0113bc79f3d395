"""`llmctl tune`: hyperparameter search over the recipe's `tune.space` with Optuna."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_override, complete_recipe_file
from llmctl.cli.output import print_json, reporting_errors

EPILOG = "Example: llmctl tune recipes/tiny-gpt-tune.yaml --trials 20 --jobs 2, then llmctl train runs/tiny-gpt-tune/best.yaml"


def tune_cli(
    recipe: Path = typer.Argument(..., help="Recipe file with a tune section.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="section.key=value overrides.", show_default=False, autocompletion=complete_override
    ),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="The study's total trials (a rerun continues to it)."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Trials at once, each in its own process with its own GPU or CPU threads."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (e.g. postgresql://...); default a SQLite file in the study dir."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="Start no trial after this many seconds."),
    study_dir: Optional[Path] = typer.Option(None, "--study-dir", help="Study dir (default runs/<run.name>)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Search the recipe's tune.space: trials are ordinary train runs, pruned early, resumable."""
    with reporting_errors(json_out):
        from llmctl.cli.prepare import run_prepare
        from llmctl.cli.tune_display import TrialsDisplay, print_summary
        from llmctl.config import load_recipe
        from llmctl.tuning.local import run_study

        extra = [*(overrides or [])]
        if trials is not None:
            extra.append(f"tune.trials={trials}")
        if timeout is not None:
            extra.append(f"tune.timeout_s={timeout}")
        resolved = load_recipe(recipe, extra)
        outcome = run_study(recipe, extra, resolved, study_dir or Path("runs") / resolved.name, storage, jobs,
                            TrialsDisplay(), prepare=run_prepare)
        print_summary(outcome.summary, to_stdout=not json_out)
        outcome.raise_for_stop()
        if json_out:
            print_json(outcome.summary)
        if outcome.interrupted:
            raise typer.Exit(130)
