"""What `prepare` says about a dataset dir of token shards (the lm and instruct tasks): the figures
`--json` prints, and the lines people read on stderr. Plain text: the CLI escapes and prints them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def token_shards_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The figures of a token-shards dataset dir's meta.json that `prepare --json` prints."""
    splits = meta.get("splits", {})
    sources = meta.get("sources", {})
    return {
        "vocab_size": meta.get("vocab_size"),
        "train_tokens": splits.get("train", {}).get("tokens"),
        "val_tokens": splits.get("val", {}).get("tokens"),
        "files": sources.get("files"),
        "bytes": sources.get("bytes"),
        "text_bytes": sources.get("text_bytes"),
        "max_bytes": (meta.get("data") or {}).get("max_bytes"),
        "unigram_perplexity": meta.get("unigram", {}).get("perplexity"),
        "skipped_files": sources.get("skipped_files"),
    }


def describe_token_shards(path: Path, s: dict[str, Any]) -> list[str]:
    """The lines saying what a prepare of token shards wrote, from its summary `s`."""
    read = f" ({s['text_bytes'] / 1e6:.1f} MB read: data.max_bytes)" if s.get("max_bytes") and s.get("text_bytes") else ""
    return [
        f"{path}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB{read} -> {s['train_tokens']:,} train / "
        f"{s['val_tokens']:,} val tokens, vocab {s['vocab_size']}, unigram val perplexity {s['unigram_perplexity']:.1f}",
        *skipped_lines(s.get("skipped_files")),
    ]


def skipped_lines(skipped: dict[str, Any] | None) -> list[str]:
    """What directory sources left out, so a corpus that lost files (or dodged bytecode) says so."""
    if not skipped or not (skipped["binary_files"] or skipped["hidden_files"] or skipped["dirs"]):
        return []

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
    return [f"  directory sources: skipped {', '.join(parts)}"]
