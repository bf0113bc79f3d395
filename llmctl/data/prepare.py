"""The `prepare` engine: sources -> tokenizer -> train.bin / val.bin / meta.json in a dataset dir
(for `data.task: lm`; classification datasets are built by data.classification, instruction data by
data.instructions).

Two streaming passes over the sources (one trains the tokenizer, one encodes), written into a staging
directory that replaces the dataset dir only once complete, so a failure never leaves a half-written
dataset nor destroys a previous good one. A rerun with the same inputs is skipped by fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from llmctl import __version__
from llmctl.artifacts import FORMAT_VERSION, DatasetDir, read_json_artifact, staged_dir, write_json_atomic
from llmctl.config.schema import DataConfig, SourceSpec
from llmctl.data.shards import SPLITS, encode_to_shards
from llmctl.data.sources import (
    Document,
    SkippedFiles,
    SourceStats,
    hash_file,
    iter_documents,
    resolve_source_files,
    split_text,
)
from llmctl.data.tokenizer import eot_id, load_tokenizer, token_byte_lengths, token_dtype, train_tokenizer
from llmctl.errors import EXIT_FAILURE, LlmctlError

# Bump when a change here would make the same inputs give different token files.
PREPARE_VERSION = 1
# Tokens read at a time when scanning a split file (bounds memory on any corpus size).
_SCAN_TOKENS = 1 << 18
# The held-out tail, when no document lands in val, is at least this many tokens (or half the train).
_MIN_TAIL_TOKENS = 1024
# Report the tokenizer pass's progress at most once per this many bytes read.
_REPORT_BYTES = 1 << 20
# The tokenizer trainer buffers 256 texts at a time from its iterator: feeding it pieces of at most
# this many characters bounds that buffer (~4 MB) whatever the size of a document. The pieces are cut
# where pre-tokenization cuts anyway (sources.split_text), so the word counts are those of the whole.
_TRAIN_PIECE_CHARS = 1 << 14

Progress = Callable[[str, int, "int | None"], None]


@dataclass
class PrepareResult:
    """Where the dataset dir is, its meta.json, and whether an up-to-date one was found and kept."""

    path: Path
    meta: dict
    skipped: bool


def document_split(seed: int, val_fraction: float) -> Callable[[Document], str]:
    """A function sending a document to "val" when a hash of (seed, key) falls below `val_fraction`.

    Stable: a document's split depends on nothing but its key and the seed. The first piece of a large
    text file ("path#0") is hashed as "path", so a file keeps its split when it grows past one piece.
    """

    def split_of(doc: Document) -> str:
        key = doc.key.removesuffix("#0")
        digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
        return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"

    return split_of


def fingerprint(data: DataConfig, inputs: list[dict], tokenizer_sha256: str | None, seed: int) -> str:
    """sha256 over everything that decides the token files: the data section (but `dir`), each input
    file's path, size and hash, the reused tokenizer's hash, and the seed."""
    payload = {
        "prepare_version": PREPARE_VERSION,
        "data": data.model_dump(mode="json", exclude={"dir"}),
        "inputs": [[f["path"], f["bytes"], f["sha256"]] for f in inputs],
        "tokenizer_sha256": tokenizer_sha256,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def prepare_dataset(
    data: DataConfig,
    out_dir: Path,
    *,
    seed: int,
    force: bool = False,
    on_progress: Progress | None = None,
    init_from: str | None = None,
) -> PrepareResult:
    """Build the dataset dir `out_dir` from `data`, or keep it when its fingerprint is already current.

    `on_progress(stage, done, total)` reports "tokenizer" (bytes read) and "encode" (bytes encoded).
    With `data.task: classification` the dir holds labelled splits instead (data.classification); with
    `instruct`, conversations and their response mask (data.instructions), which takes the tokenizer
    and chat template of `init_from` (the recipe's model.init_from) when the data section names none.
    """
    if data.task == "classification":
        from llmctl.data.classification import prepare_classification

        return prepare_classification(data, out_dir, seed=seed, force=force, on_progress=on_progress)
    if data.task == "instruct":
        from llmctl.data.instructions import prepare_instructions

        return prepare_instructions(data, out_dir, seed=seed, force=force, on_progress=on_progress, init_from=init_from)
    out = DatasetDir(Path(out_dir))
    skipped = SkippedFiles()
    files = resolve_source_files(data, skipped)
    _refuse_unsafe_out_dir(out, [p for p, _, _ in files], data.sources)
    inputs = [hash_file(p) for p, _, _ in files]
    reused = Path(data.tokenizer) if data.tokenizer else None
    tokenizer_sha = None
    if reused is not None:
        load_tokenizer(reused)  # a clear error for a missing or broken file before anything else
        tokenizer_sha = hash_file(reused)["sha256"]
    fp = fingerprint(data, inputs, tokenizer_sha, seed)

    if not force:
        current = _current_meta(out, fp)
        if current is not None:
            return PrepareResult(out.path, current, skipped=True)

    def report(stage: str, done: int, total: int | None) -> None:
        if on_progress is not None:
            on_progress(stage, done, total)

    estimate = sum(f["bytes"] for f in inputs)
    if data.max_bytes is not None:
        estimate = min(estimate, data.max_bytes)
    split_of = document_split(seed, data.val_fraction)
    with staged_dir(out.path, f"the dataset dir {out.path}") as stage:
        if reused is not None:
            tok = load_tokenizer(reused)
            if tok.token_to_id(data.special_tokens[0]) is None:
                raise LlmctlError(
                    f"data.tokenizer {str(reused)!r}: has no token {data.special_tokens[0]!r} "
                    "(data.special_tokens[0], the end-of-text token); list one the tokenizer has first "
                    "in data.special_tokens, or drop data.tokenizer to train a new one."
                )
            shutil.copyfile(reused, stage / "tokenizer.json")
            corpus_bytes = estimate
        else:
            tok, corpus_bytes = _train(data, split_of, report, estimate)
            tok.save(str(stage / "tokenizer.json"))

        eot = eot_id(tok, data.special_tokens)
        vocab_size = tok.get_vocab_size()
        dtype = token_dtype(vocab_size)
        stats = SourceStats()
        encoded = 0

        def on_encoded(n: int) -> None:
            nonlocal encoded
            encoded += n
            report("encode", encoded, corpus_bytes)

        splits = encode_to_shards(
            iter_documents(data, stats), tok, eot, split_of, stage, dtype, data.chunk_bytes, on_encoded
        )
        _refuse_changed_inputs(inputs, stats.files)
        split_kind = _ensure_val(stage, splits, dtype, token_byte_lengths(tok), data.val_fraction)
        unigram = unigram_perplexity(stage / "train.bin", stage / "val.bin", dtype, vocab_size)

        meta = {
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "eot_id": eot,
            "special_tokens": list(data.special_tokens),
            "splits": splits,
            "split": split_kind,
            "sources": {
                "files": len(inputs),
                "bytes": sum(f["bytes"] for f in inputs),
                "text_bytes": stats.bytes,
                "documents": stats.documents,
                "sha256": hashlib.sha256("".join(f["sha256"] for f in inputs).encode()).hexdigest(),
                "replaced_chars": stats.replaced_chars,
                "skipped_files": skipped.to_dict(),
                "list": inputs,
            },
            "tokenizer": {"trained": reused is None, "source": str(reused) if reused else None,
                          "sha256": tokenizer_sha},
            "fingerprint": fp,
            "data": data.model_dump(mode="json"),
            "seed": seed,
            "unigram": unigram,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "llmctl_version": __version__,
        }
        write_json_atomic(stage / "meta.json", meta)
    return PrepareResult(out.path, {"format_version": FORMAT_VERSION, **meta}, skipped=False)


def _train(data: DataConfig, split_of: Callable[[Document], str], report: Progress, estimate: int):
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


def _refuse_unsafe_out_dir(out: DatasetDir, sources: list[Path], specs: list[SourceSpec] = ()) -> None:
    """Refuse a data.dir that is a file, another kind of directory, holds a source, or lies inside a
    directory source (the next prepare would read its own output)."""
    # replace_dir_atomic deletes whatever was at out_dir: only ever an earlier dataset dir.
    if out.path.exists():
        if not out.path.is_dir():
            raise LlmctlError(f"{out.path}: exists and is not a directory; set data.dir to a dataset dir path.")
        if any(out.path.iterdir()) and not out.meta.is_file():
            raise LlmctlError(
                f"{out.path}: exists and is not a dataset dir (no meta.json); prepare would replace it. "
                "Set data.dir to a new path, or remove that directory."
            )
    root = out.path.resolve()
    for p in sources:
        if root in p.resolve().parents:
            raise LlmctlError(
                f"{p}: a source inside the dataset dir {out.path}, which prepare replaces; "
                "move the source or set data.dir elsewhere."
            )
    for i, spec in enumerate(specs):
        folder = Path(spec.path)
        if not spec.path.startswith("builtin:") and folder.is_dir() and folder.resolve() in root.parents:
            raise LlmctlError(
                f"data.dir {out.path}: inside the directory source data.sources[{i}] {spec.path!r}, so the next prepare "
                "would read its own output; set data.dir outside it."
            )


def _current_meta(out: DatasetDir, fp: str) -> dict | None:
    """The dataset dir's meta.json when it has fingerprint `fp` and its files are whole, else None."""
    if not out.meta.is_file():
        return None
    try:
        meta = read_json_artifact(out.meta, "dataset dir")
        if meta.get("fingerprint") != fp or not out.tokenizer.is_file():
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for name in SPLITS:
            path = out.split(name)
            if not path.is_file() or path.stat().st_size != int(meta["splits"][name]["tokens"]) * itemsize:
                return None
    except (LlmctlError, KeyError, TypeError, ValueError):
        return None
    return meta


def _refuse_changed_inputs(inputs: list[dict], read: list[dict]) -> None:
    hashed = {f["path"]: f["sha256"] for f in inputs}
    for f in read:
        if hashed.get(f["path"]) != f["sha256"]:
            raise LlmctlError(
                f"{f['path']}: changed while prepare was reading it; run prepare again once it is settled.",
                kind="input_changed",
                exit_code=EXIT_FAILURE,
            )


def _scan(path: Path, dtype: np.dtype, start: int = 0) -> Iterator[np.ndarray]:
    """Token ids of a split file from token `start` on, in bounded chunks."""
    with open(path, "rb") as f:
        f.seek(start * dtype.itemsize)
        while True:
            chunk = np.fromfile(f, dtype=dtype, count=_SCAN_TOKENS)
            if chunk.size == 0:
                return
            yield chunk


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
            for chunk in _scan(stage / "train.bin", dtype, start=keep):
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


def unigram_perplexity(train_path: Path, val_path: Path, dtype: np.dtype, vocab_size: int) -> dict:
    """Perplexity on val of a unigram model fitted on train token counts with add-one smoothing.

    The floor any trained model should beat; read in chunks, so memory does not follow corpus size.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in _scan(train_path, dtype):
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    train_tokens = int(counts.sum())
    log_p = np.log(counts + 1.0) - math.log(train_tokens + vocab_size)
    nll, n = 0.0, 0
    for chunk in _scan(val_path, dtype):
        nll -= float(log_p[chunk].sum())
        n += chunk.size
    return {"perplexity": math.exp(nll / n) if n else None, "train_tokens": train_tokens}
