"""`llmctl prepare`: train a tokenizer and write token shards (or labelled splits, for classification)."""

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

    with reporting_errors(json_out):
        resolved = load_recipe(recipe, overrides or [])
        result = run_prepare(resolved, force=force)
        meta = result.meta
        if json_out:
            print_json({"dataset_dir": str(result.path), "skipped": result.skipped, **_summary(meta)})


def _summary(meta: dict) -> dict:
    if meta.get("task") == "classification":
        return _classification_summary(meta)
    splits = meta.get("splits", {})
    return {
        "vocab_size": meta.get("vocab_size"),
        "train_tokens": splits.get("train", {}).get("tokens"),
        "val_tokens": splits.get("val", {}).get("tokens"),
        "files": meta.get("sources", {}).get("files"),
        "bytes": meta.get("sources", {}).get("bytes"),
        "text_bytes": meta.get("sources", {}).get("text_bytes"),
        "max_bytes": (meta.get("data") or {}).get("max_bytes"),
        "unigram_perplexity": meta.get("unigram", {}).get("perplexity"),
        "skipped_files": meta.get("sources", {}).get("skipped_files"),
    }


def _classification_summary(meta: dict) -> dict:
    splits = meta.get("splits", {})
    return {
        "task": "classification",
        "vocab_size": meta.get("vocab_size"),
        "train_examples": splits.get("train", {}).get("examples"),
        "val_examples": splits.get("val", {}).get("examples"),
        "split": meta.get("split"),
        "labels": meta.get("labels"),
        "num_classes": meta.get("num_classes"),
        "class_counts": {name: s.get("class_counts") for name, s in splits.items()},
        "max_len": meta.get("max_len"),
        "truncated": {name: s.get("truncated") for name, s in splits.items()},
        "files": meta.get("sources", {}).get("files"),
        "bytes": meta.get("sources", {}).get("bytes"),
        "skipped_files": meta.get("sources", {}).get("skipped_files"),
    }


def _say_skipped(skipped: dict | None) -> None:
    """What directory sources left out, so a corpus that lost files (or dodged bytecode) says so."""
    if not skipped or not (skipped["binary_files"] or skipped["hidden_files"] or skipped["dirs"]):
        return
    def counted(n: int, one: str, many: str) -> str:
        return f"{n:,} {one if n == 1 else many}"

    parts = []
    if skipped["binary_files"]:
        parts.append(counted(skipped["binary_files"], "binary file", "binary files"))
    if skipped["hidden_files"]:
        parts.append(counted(skipped["hidden_files"], "hidden file", "hidden files"))
    if skipped["dirs"]:
        names = ", ".join(skipped["dir_names"][:5]) + (", ..." if len(skipped["dir_names"]) > 5 else "")
        parts.append(f"{counted(skipped['dirs'], 'directory', 'directories')} ({names})")
    say(escape(f"  directory sources: skipped {', '.join(parts)}"))


def _class_counts(counts: dict[str, int], most: int = 8) -> str:
    """`negative 2,394 · positive 2,406`, the first `most` classes then how many more."""
    from rich.markup import escape

    shown = " · ".join(f"{escape(label)} {n:,}" for label, n in list(counts.items())[:most])
    return shown + (f" · ... ({len(counts) - most} more)" if len(counts) > most else "")


def _say_classification(out_dir: Path, s: dict) -> None:
    say(
        f"{out_dir}: {s['files']} file(s), {s['bytes'] / 1e6:.1f} MB -> {s['train_examples']:,} train / "
        f"{s['val_examples']:,} val examples ({'from data.val_sources' if s['split'] == 'val_sources' else 'stratified'}), "
        f"{s['num_classes']} classes, vocab {s['vocab_size']}, max_len {s['max_len']}"
    )
    for name in ("train", "val"):
        truncated = s["truncated"][name]
        cut = f"{truncated:,} truncated to {s['max_len']} tokens" if truncated else "none truncated"
        say(f"  {name + ':':6} {_class_counts(s['class_counts'][name])}; {cut}")


def run_prepare(resolved, *, force: bool = False):
    """Prepare the recipe's dataset dir with a progress display; shared by `prepare` and `train`."""
    from llmctl.cli.progress import StageProgress
    from llmctl.data.prepare import prepare_dataset

    out_dir = resolved.data_dir()
    _say_hf_checkpoint(resolved)
    with StageProgress() as progress:
        result = prepare_dataset(resolved.data, out_dir, seed=resolved.run.seed, force=force, on_progress=progress.update)
    s = _summary(result.meta)
    if result.skipped:
        say(f"{out_dir}: up to date (inputs unchanged; --force to prepare again)")
    elif s.get("task") == "classification":
        _say_classification(out_dir, s)
    else:
        read = f" ({s['text_bytes'] / 1e6:.1f} MB read: data.max_bytes)" if s.get("max_bytes") and s.get("text_bytes") else ""
        say(
            f"{out_dir}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB{read} -> {s['train_tokens']:,} train / "
            f"{s['val_tokens']:,} val tokens, vocab {s['vocab_size']}, unigram val perplexity "
            f"{s['unigram_perplexity']:.1f}"
        )
    if not result.skipped:
        _say_skipped(s.get("skipped_files"))
    return result


def _say_hf_checkpoint(resolved) -> None:
    """Say which Hugging Face checkpoint a recipe starts from (the loader took its shape and tokenizer)."""
    init = resolved.model.init_from
    if not init:
        return
    from rich.markup import escape

    from llmctl.models.hf import describe_hf_import, is_hf_checkpoint

    if is_hf_checkpoint(init):
        for line in describe_hf_import(init, resolved.model.context_length):
            say(escape(line))
        say(escape(f"  tokenizer {resolved.data.tokenizer}, end of text {resolved.data.special_tokens[0]!r}"))
