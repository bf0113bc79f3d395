"""The byte-level BPE tokenizer: trained with the `tokenizers` library, saved as a plain tokenizer.json."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmctl.errors import LlmctlError

DEFAULT_EOT = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int, special_tokens: list[str]
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens (special tokens first: the first is id 0).

    Uses `train_from_iterator`, which reads `texts` once as a stream and never needs files on disk.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json, refusing a missing or unreadable file with a message that names it."""
    path = Path(path)
    if not path.is_file():
        raise LlmctlError(f"{path}: no such tokenizer file; point data.tokenizer at a tokenizer.json.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse problem
        raise LlmctlError(f"{path}: not a readable tokenizer.json ({e}).") from None


def eot_id(tokenizer: Tokenizer, special_tokens: list[str] | None = None) -> int:
    """Id of the end-of-text token: the first of `special_tokens`, or <|endoftext|> when none are given."""
    token = special_tokens[0] if special_tokens else DEFAULT_EOT
    found = tokenizer.token_to_id(token)
    if found is None:
        raise LlmctlError(
            f"the tokenizer has no end-of-text token {token!r}; train it with that special token "
            "or list the one it has first in data.special_tokens."
        )
    return found


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Raw bytes each token id stands for, shape (vocab,); special and added tokens count 0 bytes.

    In a byte-level vocabulary each character of a token string stands for exactly one byte.
    """
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=False).items():
        lengths[i] = len(token)
    for i in tokenizer.get_added_tokens_decoder():
        lengths[i] = 0
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits in it (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
