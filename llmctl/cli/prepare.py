"""`llmctl prepare`: train a tokenizer and write the recipe's dataset dir (its task's files and meta.json)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from llmctl.cli.completion import complete_override, complete_recipe_file
from llmctl.cli.output import print_json, reporting_errors, say

EPILOG = "Example: llmctl prepare my.yaml data.vocab_size=8192"


def prepare_cli(
    recipe: Path = typer.Argument(..., help="Recipe file.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="section.key=value overrides.", show_default=False, autocompletion=complete_override
    ),
    force: bool = typer.Option(False, "--force", help="Prepare again even if the inputs are unchanged."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (meta.json's figures) on stdout."),
) -> None:
    """Train a BPE tokenizer on the recipe's sources and write the dataset dir (train.bin, val.bin, meta.json).

    With data.task: classification, read labelled CSV/JSONL rows and write padded token ids, lengths and labels per split.
    """
    from llmctl.config import load_recipe
    from llmctl.tasks import task_named

    with reporting_errors(json_out):
        resolved = load_recipe(recipe, overrides or [])
        result = run_prepare(resolved, force=force)
        if json_out:
            summary = task_named(resolved.data.task).data.summary(result.meta)
            print_json({"dataset_dir": str(result.path), "skipped": result.skipped, **summary})


def run_prepare(resolved, *, force: bool = False):
    """Prepare the recipe's dataset dir with a progress display, then say what it holds; shared by
    `prepare`, `train` and `tune`."""
    from llmctl.cli.progress import StageProgress
    from llmctl.data.prepare import prepare_dataset
    from llmctl.tasks import task_named

    out_dir = resolved.data_dir()
    _say_hf_checkpoint(resolved)
    with StageProgress() as progress:
        result = prepare_dataset(resolved.data, out_dir, seed=resolved.run.seed, force=force, on_progress=progress.update)
    if result.skipped:
        say(f"{out_dir}: up to date (inputs unchanged; --force to prepare again)")
        return result
    task = task_named(resolved.data.task).data
    for line in task.describe(out_dir, task.summary(result.meta)):
        say(escape(line))
    return result


def _say_hf_checkpoint(resolved) -> None:
    """Say which Hugging Face checkpoint a recipe starts from (the loader took its shape and tokenizer)."""
    init = resolved.model.init_from
    if not init:
        return
    from llmctl.models.hf import describe_hf_import, is_hf_checkpoint

    if is_hf_checkpoint(init):
        for line in describe_hf_import(init, resolved.model.context_length):
            say(escape(line))
        say(escape(f"  tokenizer {resolved.data.tokenizer}, end of text {resolved.data.special_tokens[0]!r}"))
