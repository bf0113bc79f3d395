"""The prepare engine end to end on a few KB of generated text: layout, meta, splits, reruns, failures."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmctl
from llmctl.config.schema import DataConfig
from llmctl.data import sources
from llmctl.data.prepare import prepare_dataset
from llmctl.data.shards import TokenShards
from llmctl.data.tokenizer import load_tokenizer
from llmctl.errors import LlmctlError

SYLLABLES = ["ka", "lo", "mi", "ne", "tu", "ra", "shi", "po", "vel", "dor", "an", "ix", "qu", "zé", "ø", "fa"]


def vocabulary(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n)})


def write_corpus(root: Path, files: int, bytes_per_file: int, seed: int = 0) -> list[Path]:
    """`files` text files of about `bytes_per_file` bytes of sentences over a fixed made-up vocabulary."""
    rng = random.Random(seed)
    words = vocabulary()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        lines, n = [], 0
        while n < bytes_per_file:
            line = " ".join(rng.choices(words, k=rng.randint(3, 14))) + rng.choice([".\n", ",\n", "!\n", ".\n\n"])
            lines.append(line)
            n += len(line.encode())
        path = root / f"doc{i:03d}.txt"
        path.write_text("".join(lines))
        paths.append(path)
    return paths


def small_data(**overrides) -> DataConfig:
    settings = dict(sources=["corpus"], vocab_size=300, val_fraction=0.2, chunk_bytes=4096)
    settings.update(overrides)
    return DataConfig(**settings)


@pytest.fixture(autouse=True)
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_corpus(tmp_path / "corpus", files=30, bytes_per_file=300)


def test_prepare_writes_tokenizer_splits_and_meta_that_agree(tmp_path):
    result = prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    ds = tmp_path / "ds"
    assert not result.skipped and result.path == ds
    assert {p.name for p in ds.iterdir()} == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
    meta = json.loads((ds / "meta.json").read_text())
    assert meta == result.meta
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and meta["eot_id"] == 0
    assert meta["special_tokens"] == ["<|endoftext|>"] and meta["split"] == "documents"
    assert meta["seed"] == 0 and meta["data"]["vocab_size"] == 300 and meta["llmctl_version"] == llmctl.__version__
    assert meta["sources"]["files"] == 30 and len(meta["sources"]["list"]) == 30
    assert meta["sources"]["bytes"] == sum(p.stat().st_size for p in (tmp_path / "corpus").iterdir())
    splits = meta["splits"]
    for name in ("train", "val"):
        assert (ds / f"{name}.bin").stat().st_size == 2 * splits[name]["tokens"]
    assert splits["val"]["tokens"] > 0 and splits["val"]["documents"] > 0
    assert splits["train"]["documents"] + splits["val"]["documents"] == 30
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == meta["sources"]["text_bytes"]

    shards = TokenShards(ds)
    train, val = shards.split("train"), shards.split("val")
    assert shards.vocab_size == 300 and shards.dtype == np.uint16
    assert int((train == 0).sum()) == splits["train"]["documents"] and train[-1] == 0
    # Decoding a split gives back its documents' text exactly, in order.
    tok = load_tokenizer(ds / "tokenizer.json")
    texts = tok.decode(val.tolist(), skip_special_tokens=False).split("<|endoftext|>")[:-1]
    assert len(texts) == splits["val"]["documents"]
    assert all(t in {p.read_text() for p in (tmp_path / "corpus").iterdir()} for t in texts)


def test_unigram_perplexity_is_add_one_smoothed_train_counts_scored_on_val(tmp_path):
    meta = prepare_dataset(small_data(), tmp_path / "ds", seed=0).meta
    shards = TokenShards(tmp_path / "ds")
    counts = np.bincount(shards.split("train"), minlength=shards.vocab_size)
    p = (counts + 1) / (counts.sum() + shards.vocab_size)
    expected = math.exp(-np.log(p[shards.split("val")]).mean())
    assert meta["unigram"]["perplexity"] == pytest.approx(expected, rel=1e-9)
    assert meta["unigram"]["train_tokens"] == meta["splits"]["train"]["tokens"]
    assert 1 < expected < 300


def test_two_prepares_give_identical_files(tmp_path):
    prepare_dataset(small_data(), tmp_path / "a", seed=3)
    prepare_dataset(small_data(), tmp_path / "b", seed=3)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_seed_chooses_which_documents_are_held_out(tmp_path):
    a = prepare_dataset(small_data(), tmp_path / "a", seed=0).meta
    b = prepare_dataset(small_data(), tmp_path / "b", seed=1).meta
    assert a["fingerprint"] != b["fingerprint"]
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "b" / "val.bin").read_bytes()


def test_second_run_with_same_inputs_is_skipped_untouched(tmp_path):
    first = prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    before = (tmp_path / "ds" / "train.bin").stat().st_mtime_ns
    calls = []
    again = prepare_dataset(small_data(), tmp_path / "ds", seed=0, on_progress=lambda *a: calls.append(a))
    assert again.skipped and again.meta == first.meta and calls == []
    assert (tmp_path / "ds" / "train.bin").stat().st_mtime_ns == before


def test_force_rebuilds(tmp_path):
    prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    (tmp_path / "ds" / "marker").write_text("x")
    result = prepare_dataset(small_data(), tmp_path / "ds", seed=0, force=True)
    assert not result.skipped and not (tmp_path / "ds" / "marker").exists()


def test_a_changed_source_file_rebuilds(tmp_path, corpus):
    first = prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    corpus[4].write_text(corpus[4].read_text() + "an added line.\n")
    again = prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    assert not again.skipped and again.meta["fingerprint"] != first.meta["fingerprint"]


def test_a_damaged_split_file_rebuilds(tmp_path):
    prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    with open(tmp_path / "ds" / "val.bin", "ab") as f:
        f.write(b"\0")
    assert not prepare_dataset(small_data(), tmp_path / "ds", seed=0).skipped
    with pytest.raises(LlmctlError, match=r"val\.bin: \d+ bytes, but meta\.json says"):
        (tmp_path / "ds" / "val.bin").write_bytes(b"\0\0\0")
        TokenShards(tmp_path / "ds").split("val")


def test_failure_midway_leaves_the_earlier_dataset_intact(tmp_path):
    prepare_dataset(small_data(), tmp_path / "ds", seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    Path("extra.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    with pytest.raises(LlmctlError, match=r"extra\.jsonl:3: not valid JSON"):
        prepare_dataset(small_data(sources=["corpus", "extra.jsonl"]), tmp_path / "ds", seed=0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds", "extra.jsonl"]  # no staging left


def test_reused_tokenizer_is_copied_and_gives_the_same_tokens(tmp_path):
    prepare_dataset(small_data(), tmp_path / "a", seed=0)
    reused = prepare_dataset(small_data(tokenizer=str(tmp_path / "a" / "tokenizer.json")), tmp_path / "b", seed=0)
    assert reused.meta["tokenizer"]["trained"] is False
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(LlmctlError, match=r"has no token '<\|eos\|>'"):
        prepare_dataset(small_data(tokenizer=str(tmp_path / "a" / "tokenizer.json"), special_tokens=["<|eos|>"]),
                        tmp_path / "c", seed=0)
    with pytest.raises(LlmctlError, match="no such tokenizer file"):
        prepare_dataset(small_data(tokenizer="nope.json"), tmp_path / "c", seed=0)


def test_too_few_documents_hold_out_the_tail_of_train(tmp_path):
    Path("one.txt").write_text((tmp_path / "corpus" / "doc000.txt").read_text() * 20)
    meta = prepare_dataset(small_data(sources=["one.txt"]), tmp_path / "ds", seed=0).meta
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["split"] == "tail"
    total = train["tokens"] + val["tokens"]
    assert val["tokens"] == max(int(total * 0.2), min(1024, total // 2))
    assert train["bytes"] + val["bytes"] == len(Path("one.txt").read_bytes())
    shards = TokenShards(tmp_path / "ds")
    assert shards.split("val")[-1] == 0 and len(shards.split("train")) == train["tokens"]


def test_too_little_text_is_an_error(tmp_path):
    Path("tiny.txt").write_text("a")
    with pytest.raises(LlmctlError, match=r"data.sources give only 2 token\(s\), too few"):
        prepare_dataset(small_data(sources=["tiny.txt"]), tmp_path / "ds", seed=0)
    assert not (tmp_path / "ds").exists()


def test_a_file_read_in_pieces_gives_the_tokens_of_the_whole(tmp_path, monkeypatch):
    Path("big").mkdir()
    Path("big/one.txt").write_text("".join(p.read_text() for p in sorted((tmp_path / "corpus").iterdir())))
    data = small_data(sources=["big"], tokenizer=None)
    prepare_dataset(data, tmp_path / "whole", seed=0)
    monkeypatch.setattr(sources, "PIECE_BYTES", 512)
    prepare_dataset(data.model_copy(update={"tokenizer": str(tmp_path / "whole" / "tokenizer.json")}),
                    tmp_path / "pieces", seed=0)
    whole, pieces = (np.concatenate([np.fromfile(tmp_path / d / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
                     for d in ("whole", "pieces"))
    assert np.array_equal(whole, pieces)
    assert int((pieces == 0).sum()) == 1  # no end-of-text between the pieces of one file


def test_progress_reports_every_stage_up_to_the_corpus_size(tmp_path):
    seen = []
    meta = prepare_dataset(small_data(), tmp_path / "ds", seed=0, on_progress=lambda *a: seen.append(a)).meta
    stages = [s for s, _, _ in seen]
    assert sorted(set(stages), key=stages.index) == ["tokenizer", "merges", "encode"]  # reading, merging, encoding
    encode = [(d, t) for s, d, t in seen if s == "encode"]
    assert encode[-1] == (meta["sources"]["text_bytes"],) * 2


def test_refuses_to_replace_a_directory_that_is_not_a_dataset_dir(tmp_path):
    Path("notes").mkdir()
    Path("notes/keep.txt").write_text("mine")
    with pytest.raises(LlmctlError, match="not a dataset dir"):
        prepare_dataset(small_data(), tmp_path / "notes", seed=0)
    assert Path("notes/keep.txt").read_text() == "mine"


PEAK_RSS_CHILD = """
import sys
from pathlib import Path
from llmctl.config.schema import DataConfig
from llmctl.data.prepare import prepare_dataset
prepare_dataset(DataConfig(sources=[sys.argv[1]], vocab_size=512, chunk_bytes=65536), Path(sys.argv[2]), seed=0)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_follow_corpus_size(tmp_path):
    write_corpus(tmp_path / "x1", files=32, bytes_per_file=32_000, seed=1)
    write_corpus(tmp_path / "x8", files=32, bytes_per_file=256_000, seed=1)
    env = {**os.environ, "PYTHONPATH": str(Path(llmctl.__file__).parents[1])}
    peak = {}
    for name in ("x1", "x8"):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, name, f"ds-{name}"],
                             capture_output=True, text=True, env=env, check=True).stdout
        peak[name] = int(out.split()[-1])
    assert json.loads((tmp_path / "ds-x8" / "meta.json").read_text())["sources"]["text_bytes"] > 8_000_000
    assert peak["x8"] <= 1.5 * peak["x1"], peak


def test_a_special_token_string_inside_a_document_is_text_and_only_the_separators_are_end_of_text(tmp_path):
    # User text is text (as OpenAI encodes it): a document that quotes "<|endoftext|>" does not end there.
    Path("quoting").mkdir()
    quoted = "the separator is written <|endoftext|> in the docs, and <|endoftext|>again.\n"
    for i in range(6):
        Path(f"quoting/doc{i}.txt").write_text((tmp_path / "corpus" / f"doc{i:03d}.txt").read_text() + quoted)
    meta = prepare_dataset(small_data(sources=["quoting"]), tmp_path / "ds", seed=0).meta
    shards = TokenShards(tmp_path / "ds")
    tokens = np.concatenate([shards.split("train"), shards.split("val")])
    assert int((tokens == meta["eot_id"]).sum()) == 6  # one separator after each document, none inside
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer.json")
    texts = tok.decode(tokens.tolist(), skip_special_tokens=True)
    assert texts.count("<|endoftext|>") == 12 and meta["task"] == "lm"
