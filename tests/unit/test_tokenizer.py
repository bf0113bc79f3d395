"""The byte-level BPE tokenizer: training, special tokens, lossless round trips, byte lengths, dtype."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmctl.data.shards import encode_texts
from llmctl.data.sources import split_text
from llmctl.data.tokenizer import eot_id, load_tokenizer, token_byte_lengths, token_dtype, train_tokenizer
from llmctl.errors import LlmctlError

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def corpus(n_lines: int = 400) -> list[str]:
    rng = random.Random(0)
    words = ["the", "model", "token", "naïve", "café", "données", "λόγος", "数据", "def", "return",
             "    ", "\t"]
    return [" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), vocab_size=300, min_frequency=2, special_tokens=SPECIALS)


def test_special_tokens_come_first_so_end_of_text_is_id_0(tok):
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|pad|>") == 1
    assert eot_id(tok, SPECIALS) == 0
    assert eot_id(tok) == 0  # looks for <|endoftext|> when no list is given


def test_trained_vocab_has_the_size_asked_for_and_merges(tok):
    assert tok.get_vocab_size() == 300
    assert len(tok.encode("the model token").ids) < len("the model token")


@pytest.mark.parametrize(
    "text",
    ["the model", " leading  double  spaces\n", "naïve café 数据 λόγος\t\n\n", "unseen: ẞ🙂 \x00 \r\n"],
)
def test_decode_of_encode_is_the_text_exactly(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_token_byte_lengths_sum_to_the_utf8_length(tok):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),)
    for text in ["naïve café 数据 λόγος\n", "def f():\n    return 1 🙂", "".join(corpus(20))]:
        assert int(lengths[tok.encode(text).ids].sum()) == len(text.encode("utf-8"))
    assert lengths[0] == 0 and lengths[1] == 0


def test_token_dtype_is_uint16_while_ids_fit():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_eot_id_refuses_a_tokenizer_without_the_token(tok):
    with pytest.raises(LlmctlError, match="no end-of-text token '<|eos|>'"):
        eot_id(tok, ["<|eos|>"])


def test_load_tokenizer_round_trips_and_names_bad_files(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode("naïve café").ids == tok.encode("naïve café").ids
    with pytest.raises(LlmctlError, match=r"missing\.json: no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(LlmctlError, match=r"broken\.json: not a readable tokenizer\.json"):
        load_tokenizer(tmp_path / "broken.json")


def test_encode_texts_separates_documents_with_end_of_text(tok):
    ids = encode_texts(tok, ["the model", "café"], eot=0, dtype=np.uint16)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok.encode("the model").ids + [0] + tok.encode("café").ids + [0]


def test_split_text_cuts_where_encoding_the_pieces_gives_the_ids_of_the_whole(tok):
    rng = random.Random(1)
    spaces = [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\n    ", "\n\t", "    "]
    words = ["the", "model", "naïve", "数据", "(x)", "'s", "42", "🙂", "def", ":"]
    for _ in range(200):
        text = "".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randint(1, 80)))
        for max_chars in (64, 300):  # windows wide enough to always hold a clean cut
            pieces = list(split_text(text, max_chars))
            assert "".join(pieces) == text and all(len(p) <= max_chars for p in pieces)
            assert [i for p in pieces for i in tok.encode(p).ids] == tok.encode(text).ids


def test_encode_texts_reads_a_special_token_string_as_text(tok):
    ids = encode_texts(tok, ["before <|endoftext|> after", "<|pad|>"], eot=0, dtype=np.uint16)
    assert ids.tolist().count(0) == 2 and ids[-1] == 0  # only the two separators
    assert tok.token_to_id("<|pad|>") not in ids.tolist()
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == "before <|endoftext|> after<|endoftext|><|pad|><|endoftext|>"
