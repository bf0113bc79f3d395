"""Flat token files (`train.bin`, `val.bin`): sending documents to a split, encoding them into the
files, their unigram floor, and reading them back.

A split file is nothing but token ids end to end (uint16 or uint32, native byte order as numpy
writes it), each document followed by the end-of-text id: nanoGPT's contract, read with numpy.memmap.
The documents are user text: a special-token string inside one is encoded as plain text (special_text).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from llmctl.data.dataset_reader import SPLITS, PreparedDataset, memmap_file
from llmctl.data.sources import Document, split_text
from llmctl.data.special_text import encode_batch, plain_text

# Longer documents are encoded as several items of at most this many characters: the tokenizer's
# working memory per item grows with its length (~400 bytes a token for one long item), and small
# items spread over all cores. The cuts change no token (sources.split_text).
ENCODE_PIECE_CHARS = 1 << 14
# Tokens read at a time when scanning a split file (bounds memory on any corpus size).
_SCAN_TOKENS = 1 << 18


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
    (about 40 MB per MB of chunk, measured on the stdlib), not the corpus. The pieces of one file go to
    the split of its first piece, with no end-of-text id between them. A special-token string inside a
    document is encoded as plain text; the end-of-text id is only ever the separator after a document.
    Returns {split: {"tokens", "bytes", "documents"}}; `on_progress` gets bytes encoded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    plain = plain_text(tokenizer)
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
            arr = _ids_with_eot(encode_batch(plain, texts), ends, eot, dtype)
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
    """Token ids of `texts` end to end, each followed by `eot` (for evaluating on a few user files), the
    texts encoded as prepare encodes documents."""
    pieces: list[str] = []
    ends: list[bool] = []
    for text in texts:
        cut = list(split_text(text, ENCODE_PIECE_CHARS))
        pieces.extend(cut)
        ends.extend([False] * (len(cut) - 1) + [True])
    return _ids_with_eot(encode_batch(plain_text(tokenizer), pieces), ends, eot, np.dtype(dtype))


def scan_tokens(path: Path, dtype: np.dtype, start: int = 0) -> Iterator[np.ndarray]:
    """Token ids of a split file from token `start` on, in bounded chunks."""
    with open(path, "rb") as f:
        f.seek(start * dtype.itemsize)
        while True:
            chunk = np.fromfile(f, dtype=dtype, count=_SCAN_TOKENS)
            if chunk.size == 0:
                return
            yield chunk


def unigram_perplexity(train_path: Path, val_path: Path, dtype: np.dtype, vocab_size: int) -> dict:
    """Perplexity on val of a unigram model fitted on train token counts with add-one smoothing.

    The floor any trained model should beat; read in chunks, so memory does not follow corpus size.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in scan_tokens(train_path, dtype):
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    train_tokens = int(counts.sum())
    log_p = np.log(counts + 1.0) - math.log(train_tokens + vocab_size)
    nll, n = 0.0, 0
    for chunk in scan_tokens(val_path, dtype):
        nll -= float(log_p[chunk].sum())
        n += chunk.size
    return {"perplexity": math.exp(nll / n) if n else None, "train_tokens": train_tokens}


class TokenShards(PreparedDataset):
    """The token splits of a dataset dir, checked against its meta.json and read through numpy.memmap.

    An instruct dataset's shards are token shards too (its masks lie beside them): eval and compress
    score a model trained on it on the whole conversations.
    """

    TASKS = ("lm", "instruct")
    WRONG_TASK = ("{path}: a {task} dataset, not token shards for language modelling; "
                  "use a recipe with data.task: classification, or prepare with data.task: lm.")

    def read_fields(self, meta: dict) -> None:
        self.dtype = np.dtype(meta["dtype"])
        self.eot_id = int(meta["eot_id"])

    def tokens(self, name: str) -> int:
        """Token count of a split according to meta.json."""
        return int(self._splits[name]["tokens"]) if name in self._splits else 0

    def split(self, name: str) -> np.ndarray:
        """The split's token ids as a read-only memmap, shape (tokens,)."""
        return memmap_file(self.dir.split(name), self.dtype, self.count(name, "tokens"))
