"""The classification task's dataset: labelled CSV/JSONL rows -> padded token ids, lengths and labels.

`prepare` reads every row of `data.sources` (a text column and a label column), holds out a stratified
val split (or reads `data.val_sources`), trains a byte-level BPE tokenizer on the train texts, and writes
per split

    {split}.ids.npy      int32 (N, max_len)  token ids, truncated to max_len, padded with pad_id
    {split}.lengths.npy  int32 (N,)          real tokens per row (1..max_len); padding is never read
    {split}.labels.npy   int64 (N,)          class index into meta.json's "labels"

beside tokenizer.json and meta.json, through the shared skeleton (data.dataset_builder).
`ClassificationData` reads it back.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer

from llmctl.config.schema import DataConfig
from llmctl.data.dataset_builder import DatasetBuild, Progress, PrepareResult
from llmctl.data.dataset_reader import SPLITS, PreparedDataset, load_npy
from llmctl.data.labelled import LabelledRows, encode_padded, label_order, read_labelled_sources
from llmctl.data.prepare_summary import skipped_lines
from llmctl.data.sources import SkippedFiles, SourceStats, resolve_specs
from llmctl.errors import LlmctlError

# Classes listed by name in an error message before "and N more".
_LIST_CLASSES = 20


# --- the dataset dir --------------------------------------------------------------------------------


def split_files(root: Path, split: str) -> tuple[Path, Path, Path]:
    """The (ids, lengths, labels) .npy files of `split` in a classification dataset dir."""
    root = Path(root)
    return root / f"{split}.ids.npy", root / f"{split}.lengths.npy", root / f"{split}.labels.npy"


class ClassificationData(PreparedDataset):
    """A classification dataset dir as prepare wrote it: its label set and, per split, the padded token
    ids (N, max_len), lengths (N,) and class indices (N,), memory-mapped."""

    TASKS = ("classification",)
    WRONG_TASK = ("{path}: a language-modelling dataset dir (token shards), not a classification one; "
                  "prepare it from a recipe with data.task: classification (and a data.dir of its own).")

    def read_fields(self, meta: dict[str, Any]) -> None:
        self.labels: list[str] = [str(label) for label in meta["labels"]]
        self.num_classes = int(meta["num_classes"])
        self.max_len = int(meta["max_len"])
        self.pad_id = int(meta["pad_id"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32 (N, max_len), lengths int32 (N,), labels int64 (N,)) of split `name` (train or val)."""
        n = self.count(name, "examples")
        ids, lengths, labels = split_files(self.path, name)
        return load_npy(ids, (n, self.max_len)), load_npy(lengths, (n,)), load_npy(labels, (n,))


def open_dataset(path: str | Path) -> ClassificationData:
    """The classification dataset dir at `path`."""
    return ClassificationData(path)


# --- prepare ----------------------------------------------------------------------------------------


@dataclass
class _Splits:
    """The labelled rows prepare read, split: the class order, how (stratified or val_sources), and what
    each pass over the sources read."""

    train: LabelledRows
    val: LabelledRows
    classes: list[str]
    how: str
    rows: int
    stats: SourceStats
    val_stats: SourceStats


def prepare(data: DataConfig, out_dir: Path, *, seed: int, force: bool = False, on_progress: Progress | None = None,
            init_from: str | None = None) -> PrepareResult:
    """Build the classification dataset dir `out_dir` from `data`, or keep it when its fingerprint is current.

    `on_progress(stage, done, total)` reports "tokenizer" and "encode" in bytes of text; `init_from` is
    not read (a classifier's tokenizer is data.tokenizer or a new one).
    """
    skipped = SkippedFiles()
    files = [p for p, _, _ in resolve_specs(data.sources, skipped=skipped)]
    val_files = [p for p, _, _ in resolve_specs(data.val_sources, "data.val_sources", skipped)] if data.val_sources else []
    build = DatasetBuild("classification", data, out_dir, seed=seed, inputs={"sources": files, "val_sources": val_files},
                         specs=[*data.sources, *(data.val_sources or [])], skipped=skipped,
                         tokenizer=Path(data.tokenizer) if data.tokenizer else None, on_progress=on_progress)
    if not force and (kept := build.current(open_dataset)) is not None:
        return kept
    read = _read_splits(data, build, seed)
    with build.staged() as stage:
        tok = build.reused_tokenizer() if build.reused is not None else build.train_on(read.train.texts)
        pad = build.save_tokenizer(stage, tok)  # the end-of-text id pads: padded positions are never read
        encoded = build.counter("encode", sum(len(t.encode("utf-8")) for t in read.train.texts + read.val.texts))
        splits = {name: _write_split(stage, name, part, read.classes, tok, data.max_len, pad, encoded)
                  for name, part in (("train", read.train), ("val", read.val))}
        return build.write_meta(stage, tok, {
            "labels": read.classes,
            "num_classes": len(read.classes),
            "max_len": data.max_len,
            "pad_id": pad,
            "splits": splits,
            "split": read.how,
            "sources": build.sources_record("sources", read.stats, rows=read.rows),
            "val_sources": build.sources_record("val_sources", read.val_stats, rows=len(read.val.texts))
            if data.val_sources else None,
        })


def _read_splits(data: DataConfig, build: DatasetBuild, seed: int) -> _Splits:
    """Every labelled row of the sources (up to data.max_bytes of text), split into train and val."""
    replace = data.encoding_errors == "replace"
    stats, val_stats = SourceStats(), SourceStats()
    rows = read_labelled_sources(data.sources, "data.sources", replace, stats)
    build.refuse_changed("sources", stats)
    rows = _within_bytes(rows, data.max_bytes)
    if not rows.texts:
        raise LlmctlError(f"data.max_bytes {data.max_bytes}: keeps no row (the first text is longer); raise it.")
    if data.val_sources:
        val = read_labelled_sources(data.val_sources, "data.val_sources", replace, val_stats)
        build.refuse_changed("val_sources", val_stats)
        return _Splits(rows, val, _classes(data, rows, val), "val_sources", len(rows.texts), stats, val_stats)
    classes = _classes(data, rows, None)
    train_at, val_at = stratified_split(rows.labels, data.val_fraction, seed)
    if not len(val_at):
        raise LlmctlError(
            f"data.sources hold {len(rows.texts)} row(s), too few to hold out a val split (each class needs "
            "at least 2 rows); add rows, or give labelled val files in data.val_sources."
        )
    return _Splits(_take(rows, train_at), _take(rows, val_at), classes, "stratified", len(rows.texts), stats, val_stats)


def _write_split(stage: Path, name: str, part: LabelledRows, classes: list[str], tok: Tokenizer, max_len: int,
                 pad_id: int, on_encoded: Callable[[int], None]) -> dict[str, Any]:
    """Encode and save split `name`'s rows; returns its meta.json record."""
    ids, lengths, truncated = encode_padded(tok, part.texts, max_len, pad_id, on_encoded)
    index = {label: i for i, label in enumerate(classes)}
    labels = np.array([index[label] for label in part.labels], dtype=np.int64)  # (N,)
    for path, array in zip(split_files(stage, name), (ids, lengths, labels)):
        np.save(path, array)
    counts = np.bincount(labels, minlength=len(classes))
    return {
        "examples": len(part.texts),
        "class_counts": {label: int(n) for label, n in zip(classes, counts)},
        "truncated": truncated,
        "tokens": int(lengths.sum()),
    }


# --- labels and the split ---------------------------------------------------------------------------


def _listing(labels: list[str]) -> str:
    shown = ", ".join(labels[:_LIST_CLASSES])
    return shown + (f" and {len(labels) - _LIST_CLASSES} more" if len(labels) > _LIST_CLASSES else "")


def _classes(data: DataConfig, train: LabelledRows, val: LabelledRows | None) -> list[str]:
    """The class order, refusing labels outside data.labels, val labels unseen in train, and fewer than 2 classes."""
    if data.labels is not None:
        classes = list(data.labels)
        if len(set(classes)) != len(classes):
            twice = sorted({c for c in classes if classes.count(c) > 1})
            raise LlmctlError(f"data.labels: names {', '.join(map(repr, twice))} more than once; list each class once.")
        known = set(classes)
        for rows in (train, val) if val is not None else (train,):
            for label, where in zip(rows.labels, rows.where):
                if label not in known:
                    raise LlmctlError(
                        f"{where}: label {label!r} is not in data.labels ({_listing(classes)}); "
                        "add it there, or drop data.labels to take the labels from the data."
                    )
    else:
        classes = label_order(set(train.labels))
    if len(classes) < 2:
        found = f"one class ({classes[0]!r})" if classes else "no class"
        raise LlmctlError(
            f"data.sources hold {found}; classification needs at least 2. Check that each source's "
            "label_field names the column that holds the labels."
        )
    if val is not None:
        seen = set(train.labels)
        for label, where in zip(val.labels, val.where):
            if label not in seen:
                raise LlmctlError(
                    f"{where}: label {label!r} never occurs in train (data.sources; train labels: "
                    f"{_listing(label_order(seen))}); a model cannot learn a class it never sees: add train rows "
                    "of it, or fix the label."
                )
    return classes


def stratified_split(labels: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), each in row order: round(val_fraction x count) rows of every class go
    to val (at least 1 when the class has 2 or more rows), chosen by a generator seeded by (seed, label),
    so a class's split depends only on its own rows."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    val: list[int] = []
    for label, rows in by_label.items():
        n = len(rows)
        take = int(val_fraction * n + 0.5)  # round half up
        if n >= 2:
            take = min(max(take, 1), n - 1)
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        val.extend(rows[j] for j in rng.permutation(n)[:take])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _take(rows: LabelledRows, index: np.ndarray) -> LabelledRows:
    return LabelledRows([rows.texts[i] for i in index], [rows.labels[i] for i in index], [rows.where[i] for i in index])


def _within_bytes(rows: LabelledRows, max_bytes: int | None) -> LabelledRows:
    """The first rows whose texts add up to at most `max_bytes` UTF-8 bytes (all when None)."""
    if max_bytes is None:
        return rows
    total, keep = 0, 0
    for text in rows.texts:
        total += len(text.encode("utf-8"))
        if total > max_bytes:
            break
        keep += 1
    return LabelledRows(rows.texts[:keep], rows.labels[:keep], rows.where[:keep])


# --- what prepare says ------------------------------------------------------------------------------


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The figures of a classification dataset dir's meta.json that `prepare --json` prints."""
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


def describe(path: Path, s: dict[str, Any]) -> list[str]:
    """The lines saying what a classification prepare wrote, from its summary `s`."""
    lines = [
        f"{path}: {s['files']} file(s), {s['bytes'] / 1e6:.1f} MB -> {s['train_examples']:,} train / "
        f"{s['val_examples']:,} val examples ({'from data.val_sources' if s['split'] == 'val_sources' else 'stratified'}), "
        f"{s['num_classes']} classes, vocab {s['vocab_size']}, max_len {s['max_len']}"
    ]
    for name in SPLITS:
        truncated = s["truncated"][name]
        cut = f"{truncated:,} truncated to {s['max_len']} tokens" if truncated else "none truncated"
        lines.append(f"  {name + ':':6} {_class_counts(s['class_counts'][name])}; {cut}")
    return lines + skipped_lines(s.get("skipped_files"))


def _class_counts(counts: dict[str, int], most: int = 8) -> str:
    """`negative 2,394 · positive 2,406`, the first `most` classes then how many more."""
    shown = " · ".join(f"{label} {n:,}" for label, n in list(counts.items())[:most])
    return shown + (f" · ... ({len(counts) - most} more)" if len(counts) > most else "")
