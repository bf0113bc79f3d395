"""`llmctl prepare`: train a tokenizer and write token shards."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_recipe_file
from llmctl.cli.output import print_json, reporting_errors, say

EPILOG = "Example: llmctl prepare my.yaml data.vocab_size=8192"


def prepare_cli(
    recipe: Path = typer.Argument(..., help="Recipe file.", autocompletion=complete_recipe_file),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Prepare again even if the inputs are unchanged."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (meta.json's figures) on stdout."),
) -> None:
    """Train a BPE tokenizer on the recipe's sources and write the dataset dir (train.bin, val.bin, meta.json)."""
    from llmctl.config import load_recipe

    with reporting_errors(json_out):
        resolved = load_recipe(recipe, overrides or [])
        result = run_prepare(resolved, force=force)
        meta = result.meta
        if json_out:
            print_json({"dataset_dir": str(result.path), "skipped": result.skipped, **_summary(meta)})


def _summary(meta: dict) -> dict:
    splits = meta.get("splits", {})
    return {
        "vocab_size": meta.get("vocab_size"),
        "train_tokens": splits.get("train", {}).get("tokens"),
        "val_tokens": splits.get("val", {}).get("tokens"),
        "files": meta.get("sources", {}).get("files"),
        "bytes": meta.get("sources", {}).get("bytes"),
        "unigram_perplexity": meta.get("unigram", {}).get("perplexity"),
    }


def run_prepare(resolved, *, force: bool = False):
    """Prepare the recipe's dataset dir with a progress display; shared by `prepare` and `train`."""
    from llmctl.cli.progress import StageProgress
    from llmctl.data.prepare import prepare_dataset

    out_dir = resolved.data_dir()
    with StageProgress() as progress:
        result = prepare_dataset(resolved.data, out_dir, seed=resolved.run.seed, force=force, on_progress=progress.update)
    s = _summary(result.meta)
    if result.skipped:
        say(f"{out_dir}: up to date (inputs unchanged; --force to prepare again)")
    else:
        say(
            f"{out_dir}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB -> {s['train_tokens']:,} train / "
            f"{s['val_tokens']:,} val tokens, vocab {s['vocab_size']}, unigram val perplexity "
            f"{s['unigram_perplexity']:.1f}"
        )
    return result
