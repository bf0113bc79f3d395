"""Flat token files (`train.bin`, `val.bin`): encoding documents into them, and reading them back.

A split file is nothing but token ids end to end (uint16 or uint32, native byte order as numpy
writes it), each document followed by the end-of-text id: nanoGPT's contract, read with numpy.memmap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer

from llmctl.artifacts import DatasetDir
from llmctl.data.sources import Document, split_text
from llmctl.errors import LlmctlError

SPLITS = ("train", "val")
# Longer documents are encoded as several items of at most this many characters: the tokenizer's
# working memory per item grows with its length (~400 bytes a token for one long item), and small
# items spread over all cores. The cuts change no token (sources.split_text).
ENCODE_PIECE_CHARS = 1 << 14


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list:
    # encode_batch_fast skips computing character offsets we never use (tokenizers >= 0.21).
    fast = getattr(tokenizer, "encode_batch_fast", None)
    return (fast or tokenizer.encode_batch)(texts, add_special_tokens=False)


def _ids_with_eot(encodings: list, ends: list[bool], eot: int, dtype: np.dtype) -> np.ndarray:
    """Token ids of a batch end to end, with `eot` after each encoding whose `ends` is True."""
    ids: list[int] = []
    for enc, end in zip(encodings, ends):
        ids.extend(enc.ids)
        if end:
            ids.append(eot)
    return np.array(ids, dtype=dtype)


def encode_to_shards(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    eot: int,
    split_of: Callable[[Document], str],
    out_dir: Path,
    dtype,
    chunk_bytes: int,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Encode `docs` into `out_dir/train.bin` and `out_dir/val.bin`, batch by batch.

    Documents are gathered into batches of about `chunk_bytes` bytes of text, each encoded in parallel
    by `tokenizer.encode_batch` and appended to its split's file, so memory follows `chunk_bytes`
    (about 40 MB per MB of chunk, measured on the stdlib), not the corpus. The pieces of one file go to the split of its first piece, with no end-of-text id
    between them. Returns {split: {"tokens", "bytes", "documents"}}; `on_progress` gets bytes encoded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    counts = {name: {"tokens": 0, "bytes": 0, "documents": 0} for name in SPLITS}
    files = {name: open(out_dir / f"{name}.bin", "wb") for name in SPLITS}
    # One pending batch per split keeps each split's documents in corpus order.
    batches: dict[str, tuple[list[str], list[bool]]] = {name: ([], []) for name in SPLITS}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        for name in SPLITS:
            texts, ends = batches[name]
            if not texts:
                continue
            arr = _ids_with_eot(_encode_batch(tokenizer, texts), ends, eot, dtype)
            files[name].write(arr.tobytes())
            counts[name]["tokens"] += int(arr.size)
            batches[name] = ([], [])
        if on_progress is not None and pending_bytes:
            on_progress(pending_bytes)
        pending_bytes = 0

    try:
        split = None  # the split of the file whose next piece is due, while pieces continue
        for doc in docs:
            if split is None:
                split = split_of(doc)
                if split not in counts:
                    raise ValueError(f"split_of returned {split!r}; expected one of {SPLITS}")
            counts[split]["bytes"] += len(doc.text) if doc.text.isascii() else len(doc.text.encode("utf-8"))
            if not doc.continues:
                counts[split]["documents"] += 1
            texts, ends = batches[split]
            pieces = list(split_text(doc.text, ENCODE_PIECE_CHARS))
            for i, piece in enumerate(pieces):
                texts.append(piece)
                ends.append(i == len(pieces) - 1 and not doc.continues)
                pending_bytes += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
                if pending_bytes >= chunk_bytes:
                    flush()
                    texts, ends = batches[split]
            split = split if doc.continues else None
        flush()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    return counts


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str], eot: int, dtype) -> np.ndarray:
    """Token ids of `texts` end to end, each followed by `eot` (for evaluating on a few user files)."""
    pieces: list[str] = []
    ends: list[bool] = []
    for text in texts:
        cut = list(split_text(text, ENCODE_PIECE_CHARS))
        pieces.extend(cut)
        ends.extend([False] * (len(cut) - 1) + [True])
    return _ids_with_eot(_encode_batch(tokenizer, pieces), ends, eot, np.dtype(dtype))


class TokenShards:
    """The token splits of a dataset dir, checked against its meta.json and read through numpy.memmap."""

    def __init__(self, dataset_dir: Path):
        self.dir = DatasetDir(Path(dataset_dir))
        self.meta = self.dir.read_meta()
        # An instruct dataset's shards are token shards too (its masks lie beside them): eval and compress
        # score a model trained on it on the whole conversations.
        if self.meta.get("task", "lm") not in ("lm", "instruct"):
            raise LlmctlError(
                f"{self.dir.path}: a {self.meta['task']} dataset, not token shards for language modelling; "
                "use a recipe with data.task: classification, or prepare with data.task: lm."
            )
        try:
            self.vocab_size = int(self.meta["vocab_size"])
            self.dtype = np.dtype(self.meta["dtype"])
            self.eot_id = int(self.meta["eot_id"])
            self._splits = dict(self.meta["splits"])
        except (KeyError, TypeError, ValueError) as e:
            raise LlmctlError(
                f"{self.dir.meta}: damaged ({e!r} missing or malformed); run `llmctl prepare --force`."
            ) from None

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def tokenizer_path(self) -> Path:
        return self.dir.tokenizer

    def tokens(self, name: str) -> int:
        """Token count of a split according to meta.json."""
        return int(self._splits[name]["tokens"]) if name in self._splits else 0

    def split(self, name: str) -> np.ndarray:
        """The split's token ids as a read-only memmap, shape (tokens,)."""
        path = self.dir.split(name)
        if name not in self._splits:
            raise LlmctlError(f"{self.dir.meta}: no split {name!r} (has {', '.join(self._splits)}).")
        if not path.is_file():
            raise LlmctlError(f"{path}: missing; run `llmctl prepare` again to rebuild the dataset dir.")
        size = path.stat().st_size
        expected = self.tokens(name)
        if size % self.dtype.itemsize or size // self.dtype.itemsize != expected:
            raise LlmctlError(
                f"{path}: {size} bytes, but meta.json says {expected} {self.dtype.name} tokens "
                f"({expected * self.dtype.itemsize} bytes); the dataset dir is damaged, run `llmctl prepare --force`."
            )
        if size == 0:  # mmap refuses empty files
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(expected,))
