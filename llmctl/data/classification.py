"""Sequence classification data: labelled CSV/JSONL rows -> padded token ids, lengths and labels.

`prepare` with `data.task: classification` reads every row of `data.sources` (a text column and a label
column), holds out a stratified val split (or reads `data.val_sources`), trains a byte-level BPE tokenizer
on the train texts, and writes per split

    {split}.ids.npy      int32 (N, max_len)  token ids, truncated to max_len, padded with pad_id
    {split}.lengths.npy  int32 (N,)          real tokens per row (1..max_len); padding is never read
    {split}.labels.npy   int64 (N,)          class index into meta.json's "labels"

beside tokenizer.json and meta.json, through a staging dir that replaces the dataset dir only once
complete (as the language-modelling path does). `ClassificationData` reads it back;
`read_labelled_file` and `encode_for_classification` serve eval and serve on new files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from llmctl import __version__
from llmctl.artifacts import FORMAT_VERSION, DatasetDir, read_json_artifact, staged_dir, write_json_atomic
from llmctl.config.schema import DataConfig, SourceSpec
from llmctl.data.shards import SPLITS, _encode_batch
from llmctl.data.sources import SkippedFiles, SourceStats, csv_rows, hash_file, iter_decoded_lines, resolve_specs
from llmctl.data.tokenizer import eot_id, load_tokenizer, train_tokenizer
from llmctl.errors import LlmctlError

# Bump when a change here would make the same inputs give different split files.
CLASSIFICATION_VERSION = 1
# Texts encoded per batch: bounds the tokenizer's working memory and paces the progress reports.
_ENCODE_BATCH = 4096
# Classes listed by name in an error message before "and N more".
_LIST_CLASSES = 20
_INTEGER = re.compile(r"[+-]?\d+")

Progress = Callable[[str, int, "int | None"], None]


class LabelledRow(NamedTuple):
    """One row of a labelled file: its text, its label as a string (None when absent), its line (from 1)."""

    text: str
    label: str | None
    line: int


@dataclass
class _Rows:
    """The rows of some sources, each with "file:line" for messages."""

    texts: list[str]
    labels: list[str]
    where: list[str]


# --- reading labelled files -------------------------------------------------------------------------


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(path.suffix.lower(), "")


def _fix(hint: str, key: str, what: str) -> str:
    """What to set to read another column or format: `set data.sources[0].label_field: to ...` in a recipe."""
    return f"set {hint}{key}: to {what}" if hint else f"name {what} with {key}"


def _label_string(value: object) -> str | None:
    """A label cell as a string: names are stripped, integers (not booleans) written in decimal."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(type(value).__name__)


def _csv_rows(
    lines: Iterator[tuple[int, str]], display: str, text_field: str, label_field: str, require_labels: bool, hint: str
) -> Iterator[LabelledRow]:
    rows = csv_rows((line for _, line in lines), display)  # strict: ragged rows and open quotes are refused
    first = next(rows, None)
    if first is None:
        raise LlmctlError(f"{display}: empty; a labelled CSV starts with a header row naming its columns, e.g. text,label.")
    header = [name.strip() for name in first[1]]
    columns = ", ".join(header) or "none"
    if text_field not in header:
        raise LlmctlError(
            f"{display}:1: no text column {text_field!r} (columns: {columns}); "
            f"{_fix(hint, 'field', 'the column that holds the texts')}."
        )
    has_labels = label_field in header
    if require_labels and not has_labels:
        raise LlmctlError(
            f"{display}:1: no label column {label_field!r} (columns: {columns}); "
            f"{_fix(hint, 'label_field', 'the column that holds the labels')}."
        )
    for name in {text_field, label_field} & set(header):
        if header.count(name) > 1:
            raise LlmctlError(f"{display}:1: the column {name!r} is named twice (columns: {columns}); rename one of them.")
    text_at = header.index(text_field)
    label_at = header.index(label_field) if has_labels else None
    for line, row in rows:
        label = _label_string(row[label_at]) if label_at is not None else None
        if require_labels and label is None:
            raise LlmctlError(f"{display}:{line}: the label ({label_field!r}) is empty; every row needs one.")
        yield LabelledRow(row[text_at], label, line)


def _jsonl_rows(
    lines: Iterator[tuple[int, str]], display: str, text_field: str, label_field: str, require_labels: bool, hint: str
) -> Iterator[LabelledRow]:
    for line, raw in lines:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.rstrip("\r\n"))  # so a cut-off line's error points into it, not past it
        except json.JSONDecodeError as e:
            raise LlmctlError(
                f"{display}:{line}: not valid JSON ({e.msg} at column {e.colno}); JSON Lines needs one object per line."
            ) from None
        if not isinstance(obj, dict):
            raise LlmctlError(f"{display}:{line}: expected a JSON object with {text_field!r} and {label_field!r}, "
                              f"got {type(obj).__name__}.")
        keys = ", ".join(map(str, obj)) or "none"
        text = obj.get(text_field)
        if not isinstance(text, str):
            problem = "no" if text is None else "a non-string"
            raise LlmctlError(f"{display}:{line}: {problem} text field {text_field!r} (keys: {keys}); "
                              f"{_fix(hint, 'field', 'the key that holds the text')}.")
        value = obj.get(label_field)
        if value is None:
            if require_labels:
                raise LlmctlError(f"{display}:{line}: no label field {label_field!r} (keys: {keys}); "
                                  f"{_fix(hint, 'label_field', 'the key that holds the label')}.")
            label = None
        else:
            try:
                label = _label_string(value)
            except TypeError as e:
                raise LlmctlError(f"{display}:{line}: the label {label_field!r} is a {e}, {value!r}; "
                                  "a label is a name (string) or an integer.") from None
            if label is None and require_labels:
                raise LlmctlError(f"{display}:{line}: the label ({label_field!r}) is empty; every row needs one.")
        yield LabelledRow(text, label, line)


def _read_rows(
    path: Path, fmt: str, *, text_field: str, label_field: str, require_labels: bool, replace: bool,
    stats: SourceStats, hint: str = "", display: str | None = None,
) -> list[LabelledRow]:
    """Every row of one labelled file, refusing an empty text or an empty file with file:line."""
    display = display or str(path)
    kind = _format_of(path, fmt)
    if kind not in ("csv", "jsonl"):
        got = f"format {fmt}" if fmt != "auto" else f"a file named {path.name!r}"
        raise LlmctlError(
            f"{display}: labelled data is read from CSV or JSONL, got {got}; "
            f"name the file .csv or .jsonl, or {_fix(hint, 'format', 'csv or jsonl')}."
        )
    if not path.is_file():
        raise LlmctlError(f"{display}: no such file.")
    reader = _csv_rows if kind == "csv" else _jsonl_rows
    lines = iter_decoded_lines(path, display, replace=replace, stats=stats)
    rows = []
    for row in reader(lines, display, text_field, label_field, require_labels, hint):
        if not row.text.strip():
            raise LlmctlError(
                f"{display}:{row.line}: the text ({text_field!r}) is empty; every row needs a text: "
                "fill it in or remove the row."
            )
        rows.append(row)
    if not rows:
        raise LlmctlError(f"{display}: holds no rows, only {'a header' if kind == 'csv' else 'blank lines'}.")
    return rows


def read_labelled_file(
    path: str | Path, fmt: str = "auto", text_field: str = "text", label_field: str = "label",
    require_labels: bool = True, encoding_errors: str = "strict",
) -> list[LabelledRow]:
    """Every row of a CSV (header row) or JSONL (one object per line) file as (text, label, line number).

    Labels come back as strings (integers in decimal); with `require_labels=False` (predicting) a missing
    label column or empty cell gives None. Raises LlmctlError naming the file and line for a missing
    column, an empty text, a ragged CSV row or a malformed JSON line.
    """
    return _read_rows(Path(path), fmt, text_field=text_field, label_field=label_field, require_labels=require_labels,
                      replace=encoding_errors == "replace", stats=SourceStats())


def _read_sources(specs: list[SourceSpec], key: str, replace: bool, stats: SourceStats) -> _Rows:
    rows = _Rows([], [], [])
    for path, fmt, index in resolve_specs(specs, key):
        spec = specs[index]
        hint = f"{key}[{index}]."
        for row in _read_rows(path, fmt, text_field=spec.field, label_field=spec.label_field, require_labels=True,
                              replace=replace, stats=stats, hint=hint):
            rows.texts.append(row.text)
            rows.labels.append(row.label)  # type: ignore[arg-type]  # require_labels
            rows.where.append(f"{path}:{row.line}")
    return rows


# --- labels and the split ---------------------------------------------------------------------------


def label_order(labels: set[str] | list[str]) -> list[str]:
    """Class order for a label set: numeric when every label is an integer ("2" before "10"), else sorted."""
    labels = set(labels)
    if labels and all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def _listing(labels: list[str]) -> str:
    shown = ", ".join(labels[:_LIST_CLASSES])
    return shown + (f" and {len(labels) - _LIST_CLASSES} more" if len(labels) > _LIST_CLASSES else "")


def _classes(data: DataConfig, train: _Rows, val: _Rows | None) -> list[str]:
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


def _take(rows: _Rows, index: np.ndarray) -> _Rows:
    return _Rows([rows.texts[i] for i in index], [rows.labels[i] for i in index], [rows.where[i] for i in index])


def _within_bytes(rows: _Rows, max_bytes: int | None) -> _Rows:
    """The first rows whose texts add up to at most `max_bytes` UTF-8 bytes (all when None)."""
    if max_bytes is None:
        return rows
    total, keep = 0, 0
    for text in rows.texts:
        total += len(text.encode("utf-8"))
        if total > max_bytes:
            break
        keep += 1
    return _Rows(rows.texts[:keep], rows.labels[:keep], rows.where[:keep])


# --- encoding ---------------------------------------------------------------------------------------


def _encode(tokenizer: Tokenizer, texts: list[str], max_len: int, pad_id: int,
            on_encoded: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids (N, max_len) int32, lengths (N,) int32, texts truncated)."""
    ids = np.full((len(texts), max_len), pad_id, dtype=np.int32)  # (N, max_len)
    lengths = np.zeros(len(texts), dtype=np.int32)  # (N,)
    truncated = 0
    for start in range(0, len(texts), _ENCODE_BATCH):
        batch = texts[start : start + _ENCODE_BATCH]
        for i, enc in enumerate(_encode_batch(tokenizer, batch), start=start):
            row = enc.ids
            if not row:
                raise LlmctlError(f"text {i + 1} is empty; a classifier needs at least one token to read.")
            truncated += len(row) > max_len
            row = row[:max_len]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        if on_encoded is not None:
            on_encoded(sum(len(t.encode("utf-8")) for t in batch))
    return ids, lengths, truncated


def encode_for_classification(
    tokenizer: Tokenizer, texts: list[str], max_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts`, the first `max_len` tokens of each, padded with `pad_id`: (ids int32
    (N, max_len), lengths int32 (N,)), as prepare stores them. An empty text is an LlmctlError."""
    if max_len < 1:
        raise LlmctlError(f"max_len must be >= 1 token, got {max_len}.")
    for i, text in enumerate(texts):
        if not text.strip():
            raise LlmctlError(f"text {i + 1} is empty; a classifier needs a text to read.")
    ids, lengths, _ = _encode(tokenizer, list(texts), max_len, pad_id)
    return ids, lengths


# --- the dataset dir --------------------------------------------------------------------------------


def split_files(root: Path, split: str) -> tuple[Path, Path, Path]:
    """The (ids, lengths, labels) .npy files of `split` in a classification dataset dir."""
    root = Path(root)
    return root / f"{split}.ids.npy", root / f"{split}.lengths.npy", root / f"{split}.labels.npy"


class ClassificationData:
    """A classification dataset dir as prepare wrote it: its label set and, per split, the padded token
    ids (N, max_len), lengths (N,) and class indices (N,), memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = DatasetDir(self.path).read_meta()
        if self.meta.get("task") != "classification":
            raise LlmctlError(
                f"{self.path}: a language-modelling dataset dir (token shards), not a classification one; "
                "prepare it from a recipe with data.task: classification (and a data.dir of its own)."
            )

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def max_len(self) -> int:
        return int(self.meta["max_len"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        return DatasetDir(self.path).tokenizer

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32 (N, max_len), lengths int32 (N,), labels int64 (N,)) of split `name` (train or val)."""
        if name not in SPLITS:
            raise LlmctlError(f"no split {name!r} in a dataset dir; the splits are {', '.join(SPLITS)}.")
        arrays = []
        for path in split_files(self.path, name):
            if not path.is_file():
                raise LlmctlError(f"{path}: missing; the dataset dir is damaged: run `llmctl prepare --force RECIPE`.")
            try:
                arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
            except (ValueError, OSError) as e:
                raise LlmctlError(f"{path}: not a readable .npy file ({e}); run `llmctl prepare --force RECIPE`.") from None
        ids, lengths, labels = arrays
        return ids, lengths, labels


def _fingerprint(data: DataConfig, inputs: list[dict], val_inputs: list[dict], tokenizer_sha256: str | None,
                 seed: int) -> str:
    """sha256 over everything that decides the split files: the data section (but `dir`), each input
    file's path, size and hash, the reused tokenizer's hash, and the seed."""
    payload = {
        "classification_version": CLASSIFICATION_VERSION,
        "data": data.model_dump(mode="json", exclude={"dir"}),
        "inputs": [[f["path"], f["bytes"], f["sha256"]] for f in inputs],
        "val_inputs": [[f["path"], f["bytes"], f["sha256"]] for f in val_inputs],
        "tokenizer_sha256": tokenizer_sha256,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _current_meta(out: DatasetDir, fp: str) -> dict | None:
    """The dataset dir's meta.json when it has fingerprint `fp` and its split files are whole, else None."""
    if not out.meta.is_file():
        return None
    try:
        meta = read_json_artifact(out.meta, "dataset dir")
        if meta.get("task") != "classification" or meta.get("fingerprint") != fp or not out.tokenizer.is_file():
            return None
        for name in SPLITS:
            n = int(meta["splits"][name]["examples"])
            ids, lengths, labels = (np.load(p, mmap_mode="r") for p in split_files(out.path, name))
            if ids.shape != (n, int(meta["max_len"])) or lengths.shape != (n,) or labels.shape != (n,):
                return None
    except (LlmctlError, KeyError, TypeError, ValueError, OSError):
        return None
    return meta


def _sources_record(inputs: list[dict], rows: int, stats: SourceStats) -> dict:
    return {
        "files": len(inputs),
        "bytes": sum(f["bytes"] for f in inputs),
        "rows": rows,
        "sha256": hashlib.sha256("".join(f["sha256"] for f in inputs).encode()).hexdigest(),
        "replaced_chars": stats.replaced_chars,
        "list": inputs,
    }


def prepare_classification(
    data: DataConfig, out_dir: Path, *, seed: int, force: bool = False, on_progress: Progress | None = None
):
    """Build the classification dataset dir `out_dir` from `data`, or keep it when its fingerprint is current.

    `on_progress(stage, done, total)` reports "tokenizer" and "encode" in bytes of text. Returns a
    data.prepare.PrepareResult.
    """
    from llmctl.data.prepare import PrepareResult, _refuse_changed_inputs, _refuse_unsafe_out_dir

    out = DatasetDir(Path(out_dir))
    skipped = SkippedFiles()
    files = [p for p, _, _ in resolve_specs(data.sources, skipped=skipped)]
    val_files = [p for p, _, _ in resolve_specs(data.val_sources, "data.val_sources", skipped)] if data.val_sources else []
    _refuse_unsafe_out_dir(out, files + val_files, [*data.sources, *(data.val_sources or [])])
    inputs = [hash_file(p) for p in files]
    val_inputs = [hash_file(p) for p in val_files]
    reused = Path(data.tokenizer) if data.tokenizer else None
    tokenizer_sha = None
    if reused is not None:
        load_tokenizer(reused)  # a clear error for a missing or broken file before anything else
        tokenizer_sha = hash_file(reused)["sha256"]
    fp = _fingerprint(data, inputs, val_inputs, tokenizer_sha, seed)
    if not force:
        current = _current_meta(out, fp)
        if current is not None:
            return PrepareResult(out.path, current, skipped=True)

    def report(stage: str, done: int, total: int | None) -> None:
        if on_progress is not None:
            on_progress(stage, done, total)

    replace = data.encoding_errors == "replace"
    stats, val_stats = SourceStats(), SourceStats()
    rows = _read_sources(data.sources, "data.sources", replace, stats)
    _refuse_changed_inputs(inputs, stats.files)
    rows = _within_bytes(rows, data.max_bytes)
    if not rows.texts:
        raise LlmctlError(f"data.max_bytes {data.max_bytes}: keeps no row (the first text is longer); raise it.")
    if data.val_sources:
        val_rows = _read_sources(data.val_sources, "data.val_sources", replace, val_stats)
        _refuse_changed_inputs(val_inputs, val_stats.files)
        train, val, split_kind = rows, val_rows, "val_sources"
        classes = _classes(data, train, val)
    else:
        classes = _classes(data, rows, None)
        train_at, val_at = stratified_split(rows.labels, data.val_fraction, seed)
        train, val, split_kind = _take(rows, train_at), _take(rows, val_at), "stratified"
        if not len(val_at):
            raise LlmctlError(
                f"data.sources hold {len(rows.texts)} row(s), too few to hold out a val split (each class needs "
                "at least 2 rows); add rows, or give labelled val files in data.val_sources."
            )

    with staged_dir(out.path, f"the dataset dir {out.path}") as stage:
        if reused is not None:
            tok = load_tokenizer(reused)
            shutil.copyfile(reused, stage / "tokenizer.json")
        else:
            train_bytes = sum(len(t.encode("utf-8")) for t in train.texts)
            report("tokenizer", 0, train_bytes)
            tok = train_tokenizer(train.texts, data.vocab_size, data.min_frequency, data.special_tokens)
            report("tokenizer", train_bytes, train_bytes)
            tok.save(str(stage / "tokenizer.json"))
        eot = eot_id(tok, data.special_tokens)  # the pad id: padded positions are never read

        total = sum(len(t.encode("utf-8")) for t in train.texts + val.texts)
        encoded = 0

        def on_encoded(n: int) -> None:
            nonlocal encoded
            encoded += n
            report("encode", encoded, total)

        index = {label: i for i, label in enumerate(classes)}
        splits = {}
        for name, part in (("train", train), ("val", val)):
            ids, lengths, truncated = _encode(tok, part.texts, data.max_len, eot, on_encoded)
            labels = np.array([index[label] for label in part.labels], dtype=np.int64)  # (N,)
            ids_path, lengths_path, labels_path = split_files(stage, name)
            np.save(ids_path, ids)
            np.save(lengths_path, lengths)
            np.save(labels_path, labels)
            counts = np.bincount(labels, minlength=len(classes))
            splits[name] = {
                "examples": len(part.texts),
                "class_counts": {label: int(n) for label, n in zip(classes, counts)},
                "truncated": truncated,
                "tokens": int(lengths.sum()),
            }

        meta = {
            "task": "classification",
            "labels": classes,
            "num_classes": len(classes),
            "max_len": data.max_len,
            "pad_id": eot,
            "vocab_size": tok.get_vocab_size(),
            "eot_id": eot,
            "special_tokens": list(data.special_tokens),
            "splits": splits,
            "split": split_kind,
            "sources": {**_sources_record(inputs, len(rows.texts), stats), "skipped_files": skipped.to_dict()},
            "val_sources": _sources_record(val_inputs, len(val.texts), val_stats) if data.val_sources else None,
            "tokenizer": {"trained": reused is None, "source": str(reused) if reused else None,
                          "sha256": tokenizer_sha},
            "fingerprint": fp,
            "data": data.model_dump(mode="json"),
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "llmctl_version": __version__,
        }
        write_json_atomic(stage / "meta.json", meta)
    return PrepareResult(out.path, {"format_version": FORMAT_VERSION, **meta}, skipped=False)
