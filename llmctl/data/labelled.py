"""Labelled texts: CSV and JSONL rows of (text, label) read strictly, naming file:line for any fault, and
texts encoded into the padded token ids a classifier reads.

Prepare reads a classification recipe's sources through `read_labelled_sources`; eval and serve read new
files through `read_labelled_file` and encode texts through `encode_for_classification`, so a text gets
the ids training saw. Texts are user text: a special-token string inside one is plain text (special_text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from llmctl.config.schema import SourceSpec
from llmctl.data.sources import SourceStats, csv_rows, iter_decoded_lines, resolve_specs
from llmctl.data.special_text import encode_user_texts
from llmctl.errors import LlmctlError

# Texts encoded per batch: bounds the tokenizer's working memory and paces the progress reports.
_ENCODE_BATCH = 4096
_INTEGER = re.compile(r"[+-]?\d+")


class LabelledRow(NamedTuple):
    """One row of a labelled file: its text, its label as a string (None when absent), its line (from 1)."""

    text: str
    label: str | None
    line: int


@dataclass
class LabelledRows:
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


def read_labelled_sources(specs: list[SourceSpec], key: str, replace: bool, stats: SourceStats) -> LabelledRows:
    """Every row of the labelled files of `specs` (`key` names the list in messages: data.sources)."""
    rows = LabelledRows([], [], [])
    for path, fmt, index in resolve_specs(specs, key):
        spec = specs[index]
        hint = f"{key}[{index}]."
        for row in _read_rows(path, fmt, text_field=spec.field, label_field=spec.label_field, require_labels=True,
                              replace=replace, stats=stats, hint=hint):
            rows.texts.append(row.text)
            rows.labels.append(row.label)  # type: ignore[arg-type]  # require_labels
            rows.where.append(f"{path}:{row.line}")
    return rows


# --- labels and encoding ---------------------------------------------------------------------------


def label_order(labels: set[str] | list[str]) -> list[str]:
    """Class order for a label set: numeric when every label is an integer ("2" before "10"), else sorted."""
    labels = set(labels)
    if labels and all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def encode_padded(tokenizer: Tokenizer, texts: list[str], max_len: int, pad_id: int,
                  on_encoded: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids (N, max_len) int32, lengths (N,) int32, texts truncated); `on_encoded` gets bytes encoded."""
    ids = np.full((len(texts), max_len), pad_id, dtype=np.int32)  # (N, max_len)
    lengths = np.zeros(len(texts), dtype=np.int32)  # (N,)
    truncated = 0
    for start in range(0, len(texts), _ENCODE_BATCH):
        batch = texts[start : start + _ENCODE_BATCH]
        for i, enc in enumerate(encode_user_texts(tokenizer, batch), start=start):
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
    (N, max_len), lengths int32 (N,)), as prepare stores them. An empty text is an LlmctlError; a
    special-token string in a text is plain text."""
    if max_len < 1:
        raise LlmctlError(f"max_len must be >= 1 token, got {max_len}.")
    for i, text in enumerate(texts):
        if not text.strip():
            raise LlmctlError(f"text {i + 1} is empty; a classifier needs a text to read.")
    ids, lengths, _ = encode_padded(tokenizer, list(texts), max_len, pad_id)
    return ids, lengths
