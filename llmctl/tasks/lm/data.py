"""The lm task's dataset: sources -> tokenizer -> train.bin / val.bin / meta.json.

Two streaming passes over the sources (one trains the tokenizer, one encodes), written through the
shared skeleton (data.dataset_builder), so memory never follows the corpus and a rerun with the same
inputs is skipped by fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer

from llmctl.config.schema import DataConfig
from llmctl.data.dataset_builder import DatasetBuild, Progress, PrepareResult
from llmctl.data.prepare_summary import describe_token_shards, token_shards_summary
from llmctl.data.shards import TokenShards, document_split, encode_to_shards, scan_tokens, unigram_perplexity
from llmctl.data.sources import Document, SkippedFiles, SourceStats, iter_documents, resolve_source_files, split_text
from llmctl.data.tokenizer import token_byte_lengths, token_dtype, train_tokenizer
from llmctl.errors import LlmctlError

# The held-out tail, when no document lands in val, is at least this many tokens (or half the train).
_MIN_TAIL_TOKENS = 1024
# Report the tokenizer pass's progress at most once per this many bytes read.
_REPORT_BYTES = 1 << 20
# The tokenizer trainer buffers 256 texts at a time from its iterator: feeding it pieces of at most
# this many characters bounds that buffer (~4 MB) whatever the size of a document. The pieces are cut
# where pre-tokenization cuts anyway (sources.split_text), so the word counts are those of the whole.
_TRAIN_PIECE_CHARS = 1 << 14

summary = token_shards_summary
describe = describe_token_shards


def open_dataset(path: str | Path) -> TokenShards:
    """The lm dataset dir at `path`, its splits checked against meta.json."""
    return TokenShards(Path(path))


def prepare(data: DataConfig, out_dir: Path, *, seed: int, force: bool = False, on_progress: Progress | None = None,
            init_from: str | None = None) -> PrepareResult:
    """Build the lm dataset dir `out_dir` from `data`, or keep it when its fingerprint is already current.

    `on_progress(stage, done, total)` reports "tokenizer" (bytes read), "merges" and "encode" (bytes
    encoded). `init_from` is not read: a language model's tokenizer is data.tokenizer or a new one.
    """
    skipped = SkippedFiles()
    files = [p for p, _, _ in resolve_source_files(data, skipped)]
    reused = Path(data.tokenizer) if data.tokenizer else None
    build = DatasetBuild("lm", data, out_dir, seed=seed, inputs={"sources": files}, specs=data.sources,
                         skipped=skipped, tokenizer=reused, on_progress=on_progress)
    if not force and (kept := build.current(open_dataset)) is not None:
        return kept
    estimate = sum(f["bytes"] for f in build.inputs["sources"])
    if data.max_bytes is not None:
        estimate = min(estimate, data.max_bytes)
    split_of = document_split(seed, data.val_fraction)
    with build.staged() as stage:
        if reused is not None:
            tok, text_bytes = build.reused_tokenizer(), estimate
        else:
            tok, text_bytes = _train(data, split_of, build.report, estimate)
        eot = build.save_tokenizer(stage, tok)
        dtype = token_dtype(tok.get_vocab_size())
        stats = SourceStats()
        splits = encode_to_shards(iter_documents(data, stats), tok, eot, split_of, stage, dtype, data.chunk_bytes,
                                  build.counter("encode", text_bytes))
        build.refuse_changed("sources", stats)
        split_kind = _ensure_val(stage, splits, dtype, token_byte_lengths(tok), data.val_fraction)
        return build.write_meta(stage, tok, {
            "dtype": dtype.name,
            "splits": splits,
            "split": split_kind,
            "sources": build.sources_record("sources", stats, text_bytes=stats.bytes, documents=stats.documents),
            "unigram": unigram_perplexity(stage / "train.bin", stage / "val.bin", dtype, tok.get_vocab_size()),
        })


def _train(data: DataConfig, split_of: Callable[[Document], str], report: Progress, estimate: int) -> tuple[Tokenizer, int]:
    """Train the tokenizer on the train documents (all documents if none land in train).

    Returns (tokenizer, UTF-8 bytes of text in the corpus).
    """
    stats = SourceStats()
    took_any = False

    def texts(only_train: bool) -> Iterator[str]:
        nonlocal took_any
        split = None
        reported = 0
        for doc in iter_documents(data, stats):
            split = split or split_of(doc)
            if not only_train or split == "train":
                took_any = True
                yield from split_text(doc.text, _TRAIN_PIECE_CHARS)
            if stats.bytes - reported >= _REPORT_BYTES:  # millions of small JSONL rows: not every one
                reported = stats.bytes
                report("tokenizer", reported, estimate)
            if not doc.continues:
                split = None
        report("tokenizer", stats.bytes, estimate)
        report("merges", 0, None)  # the text is read: `tokenizers` now computes the merges in one call

    tok = train_tokenizer(texts(True), data.vocab_size, data.min_frequency, data.special_tokens)
    if not took_any:
        # Too few documents for the hash to send any to train; the val split will be a tail instead.
        stats = SourceStats()
        tok = train_tokenizer(texts(False), data.vocab_size, data.min_frequency, data.special_tokens)
    return tok, stats.bytes


def _ensure_val(stage: Path, splits: dict[str, dict], dtype: np.dtype, byte_lengths: np.ndarray,
                val_fraction: float) -> str:
    """Make sure both splits hold tokens; returns "documents", or "tail" when val is the end of train.

    With too few documents for the hash to put any in val (or any in train), val becomes the last
    `val_fraction` of the tokens, at least min(1024, half) of them.
    """
    train, val = splits["train"], splits["val"]
    if train["tokens"] and val["tokens"]:
        split_kind = "documents"
    else:
        if not train["tokens"]:  # every document hashed to val: they are the whole corpus
            os.replace(stage / "val.bin", stage / "train.bin")
            (stage / "val.bin").write_bytes(b"")
            train.update(val)
            val.update(tokens=0, bytes=0, documents=0)
        total = train["tokens"]
        n = max(int(total * val_fraction), min(_MIN_TAIL_TOKENS, total // 2))
        keep = total - n
        if keep < 2:
            raise LlmctlError(
                f"data.sources give only {total} token(s), too few to hold out a val split and still "
                "train on 2; add more text (or raise data.max_bytes)."
            )
        tail_bytes = 0
        with open(stage / "val.bin", "wb") as f:
            for chunk in scan_tokens(stage / "train.bin", dtype, start=keep):
                f.write(chunk.tobytes())
                tail_bytes += int(byte_lengths[chunk].sum())
        os.truncate(stage / "train.bin", keep * dtype.itemsize)
        train.update(tokens=keep, bytes=train["bytes"] - tail_bytes)
        val.update(tokens=n, bytes=tail_bytes, documents=0)
        split_kind = "tail"
    if train["tokens"] < 2:
        raise LlmctlError(
            f"the train split would hold {train['tokens']} token(s); data.sources hold too little text "
            "(add more, or raise data.max_bytes)."
        )
    return split_kind
