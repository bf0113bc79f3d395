"""Classification data: labelled CSV/JSONL rows, their errors, the stratified split, the dataset dir, and the
built-in word-order sentiment set that a bag of words cannot solve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from llmctl.config.schema import DataConfig
from llmctl.data import sentiment
from llmctl.data.labelled import encode_for_classification, label_order, read_labelled_file
from llmctl.data.prepare import prepare_dataset
from llmctl.data.sources import SENTIMENT, resolve_source_files, sentiment_path
from llmctl.data.tokenizer import load_tokenizer, train_tokenizer
from llmctl.errors import LlmctlError
from llmctl.tasks.classification.data import ClassificationData, stratified_split

WORDS = ["the", "film", "plot", "was", "good", "bad", "great", "dull", "not", "really", "acting", "music"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_csv(path: str, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    lines = [header] + [f'"{text}",{label}' for text, label in rows]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def labelled_rows(counts: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))), label)
            for label, n in counts.items() for _ in range(n)]


def data(**overrides) -> DataConfig:
    settings = dict(task="classification", sources=["reviews.csv"], vocab_size=300, min_frequency=1,
                    val_fraction=0.2, max_len=16)
    settings.update(overrides)
    return DataConfig(**settings)


# --- reading ----------------------------------------------------------------------------------------


def test_csv_rows_give_text_label_and_the_line_each_row_starts_on():
    Path("r.csv").write_text('id,label,text\n1,pos,"good\nand long"\n\n2, neg ,bad\n', encoding="utf-8")
    rows = read_labelled_file("r.csv")
    assert rows == [("good\nand long", "pos", 2), ("bad", "neg", 5)]
    assert rows[0].text == "good\nand long" and rows[1].line == 5


def test_jsonl_labels_may_be_names_or_integers_and_come_back_as_strings():
    Path("r.jsonl").write_text('{"body": "one", "y": 1}\n\n{"body": "two", "y": "neg"}\n', encoding="utf-8")
    assert read_labelled_file("r.jsonl", text_field="body", label_field="y") == [("one", "1", 1), ("two", "neg", 3)]


def test_predict_files_need_no_label_column():
    Path("p.csv").write_text("text\nhello\n", encoding="utf-8")
    assert read_labelled_file("p.csv", require_labels=False) == [("hello", None, 2)]
    Path("p.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    assert read_labelled_file("p.jsonl", require_labels=False) == [("hi", None, 1)]


def test_missing_label_column_names_file_line_columns_and_the_key_to_set():
    Path("reviews.csv").write_text("text,sentiment\ngood,pos\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"reviews\.csv:1: no label column 'label' \(columns: text, sentiment\); "
                       r"set data\.sources\[0\]\.label_field: to the column that holds the labels"):
        prepare_dataset(data(), Path("ds"), seed=0)
    Path("r.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "stars": 3}\n', encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.jsonl:2: no label field 'label' \(keys: text, stars\)"):
        read_labelled_file("r.jsonl")
    assert not Path("ds").exists()


def test_missing_text_column_names_the_columns():
    Path("r.csv").write_text("review,label\ngood,pos\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.csv:1: no text column 'text' \(columns: review, label\)"):
        read_labelled_file("r.csv")


def test_an_empty_text_names_file_and_line():
    Path("r.csv").write_text('text,label\ngood,pos\n"   ",neg\n', encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.csv:3: the text \('text'\) is empty"):
        read_labelled_file("r.csv")
    Path("r.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "", "label": 0}\n', encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.jsonl:2: the text \('text'\) is empty"):
        read_labelled_file("r.jsonl")


def test_a_ragged_csv_row_names_its_line_and_the_field_counts():
    Path("r.csv").write_text('text,label\n"a, quoted",pos\n"multi\nline",neg\ngood, not great,pos\n', encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.csv:5: 3 field\(s\) where the header has 2 \(text, label\); .*quoted"):
        read_labelled_file("r.csv")
    Path("r.csv").write_text("text,label\nonly a text\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.csv:2: 1 field\(s\) where the header has 2"):
        read_labelled_file("r.csv")


def test_a_quote_left_open_names_the_line_it_opens_on_instead_of_swallowing_the_file():
    rows = [f"review {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    rows[1] = '"an open quote,pos'  # line 3; the rest of the file would become one text
    Path("r.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"^r\.csv:3: a quote opened on this line is never closed"):
        read_labelled_file("r.csv")
    with pytest.raises(LlmctlError, match=r"^r\.csv:3: a quote opened"):
        prepare_dataset(data(sources=["r.csv"]), Path("out"), seed=0)
    assert not Path("out").exists()


def test_a_ragged_row_with_more_fields_names_the_first_bad_line():
    rows = [f"review {i},{'pos' if i % 2 else 'neg'},x" for i in range(40)]
    rows[5], rows[6] = "a,b,c,d,e", "a,b"  # lines 7 and 8
    Path("r.csv").write_text("text,label,note\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"^r\.csv:7: 5 field\(s\) where the header has 3"):
        prepare_dataset(data(sources=["r.csv"]), Path("out"), seed=0)


def test_a_label_column_named_twice_is_refused():
    Path("r.csv").write_text("text,label,label\ngood,pos,neg\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.csv:1: the column 'label' is named twice"):
        read_labelled_file("r.csv")


def test_a_malformed_json_line_names_its_line():
    Path("r.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.jsonl:2: not valid JSON"):
        read_labelled_file("r.jsonl")
    Path("r.jsonl").write_text('{"text": "a", "label": 1.5}\n', encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.jsonl:1: the label 'label' is a float, 1\.5; a label is a name"):
        read_labelled_file("r.jsonl")


def test_an_empty_label_and_an_empty_file_are_errors():
    Path("r.csv").write_text("text,label\ngood,\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"r\.csv:2: the label \('label'\) is empty"):
        read_labelled_file("r.csv")
    Path("e.csv").write_text("", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"e\.csv: empty; a labelled CSV starts with a header row"):
        read_labelled_file("e.csv")
    Path("h.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"h\.csv: holds no rows"):
        read_labelled_file("h.csv")


def test_a_plain_text_source_is_refused_for_classification():
    Path("notes.txt").write_text("good\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"notes\.txt: labelled data is read from CSV or JSONL.*data\.sources\[0\]\.format"):
        prepare_dataset(data(sources=["notes.txt"]), Path("ds"), seed=0)


# --- labels and the split ---------------------------------------------------------------------------


def test_integer_labels_sort_numerically_and_names_alphabetically():
    assert label_order({"10", "2", "1", "-3"}) == ["-3", "1", "2", "10"]
    assert label_order({"pos", "neg", "10"}) == ["10", "neg", "pos"]
    write_csv("reviews.csv", labelled_rows({"10": 6, "2": 6, "1": 6}))
    meta = prepare_dataset(data(), Path("ds"), seed=0).meta
    assert meta["labels"] == ["1", "2", "10"] and meta["num_classes"] == 3


def test_stratified_split_holds_out_the_rounded_share_of_every_class():
    labels = ["a"] * 50 + ["b"] * 20 + ["c"] * 3 + ["d"] * 2 + ["e"]
    train, val = stratified_split(labels, 0.2, seed=0)
    held = {c: sum(labels[i] == c for i in val) for c in "abcde"}
    assert held == {"a": 10, "b": 4, "c": 1, "d": 1, "e": 0}  # c: round(0.6); d: at least 1; e: a single row
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert list(train) == sorted(train) and list(val) == sorted(val)  # row order kept
    again_train, again_val = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=1)[1])


def test_prepare_records_class_counts_of_the_stratified_split():
    write_csv("reviews.csv", labelled_rows({"neg": 40, "pos": 15}))
    meta = prepare_dataset(data(), Path("ds"), seed=0).meta
    assert meta["split"] == "stratified" and meta["labels"] == ["neg", "pos"]
    assert meta["splits"]["val"]["class_counts"] == {"neg": 8, "pos": 3}
    assert meta["splits"]["train"]["class_counts"] == {"neg": 32, "pos": 12}
    assert meta["splits"]["train"]["examples"] == 44 and meta["splits"]["val"]["examples"] == 11


def test_val_sources_replace_the_split_and_an_unseen_val_label_is_named_with_its_line():
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}))
    write_csv("val.csv", [("good film", "pos"), ("bad film", "neg")])
    meta = prepare_dataset(data(val_sources=["val.csv"]), Path("ds"), seed=0).meta
    assert meta["split"] == "val_sources" and meta["splits"]["train"]["examples"] == 20
    assert meta["splits"]["val"]["class_counts"] == {"neg": 1, "pos": 1} and meta["val_sources"]["files"] == 1
    write_csv("val.csv", [("good film", "pos"), ("so so", "meh")])
    with pytest.raises(LlmctlError, match=r"val\.csv:3: label 'meh' never occurs in train .*train labels: neg, pos"):
        prepare_dataset(data(val_sources=["val.csv"]), Path("ds2"), seed=0)
    with pytest.raises(LlmctlError, match=r"data\.val_sources\[0\] 'nope\.csv': no such file"):
        prepare_dataset(data(val_sources=["nope.csv"]), Path("ds2"), seed=0)
    assert not Path("ds2").exists()


def test_data_labels_fix_the_class_order_and_refuse_other_labels():
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}))
    meta = prepare_dataset(data(labels=["pos", "neg", "mixed"]), Path("ds"), seed=0).meta
    assert meta["labels"] == ["pos", "neg", "mixed"] and meta["splits"]["train"]["class_counts"]["mixed"] == 0
    ids, lengths, labels = ClassificationData("ds").split("train")
    assert labels[0] == 1  # the first rows are "neg", class 1 in this order
    with pytest.raises(LlmctlError, match=r"reviews\.csv:2: label 'neg' is not in data\.labels \(pos\)"):
        prepare_dataset(data(labels=["pos"]), Path("ds2"), seed=0)


def test_fewer_than_two_classes_is_an_error():
    write_csv("reviews.csv", labelled_rows({"pos": 10}))
    with pytest.raises(LlmctlError, match=r"hold one class \('pos'\); classification needs at least 2"):
        prepare_dataset(data(), Path("ds"), seed=0)


# --- encoding and the dataset dir -------------------------------------------------------------------


@pytest.fixture
def tokenizer():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return train_tokenizer(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])


def test_encoding_keeps_the_first_max_len_tokens_and_pads_the_rest(tokenizer):
    long = " ".join(WORDS * 3)
    full = tokenizer.encode(long).ids
    ids, lengths = encode_for_classification(tokenizer, ["good", long], max_len=8, pad_id=0)
    assert ids.dtype == np.int32 and ids.shape == (2, 8) and lengths.dtype == np.int32
    assert lengths.tolist() == [len(tokenizer.encode("good").ids), 8]
    assert ids[1].tolist() == full[:8]
    assert (ids[0, lengths[0]:] == 0).all()
    with pytest.raises(LlmctlError, match="text 2 is empty"):
        encode_for_classification(tokenizer, ["good", "  "], max_len=8, pad_id=0)


def test_a_special_token_string_in_a_text_is_encoded_as_text(tokenizer):
    text = "good <|endoftext|> film"
    ids, lengths = encode_for_classification(tokenizer, [text], max_len=32, pad_id=0)
    assert 0 not in ids[0, : lengths[0]].tolist()  # the end-of-text id only ever pads
    assert tokenizer.decode(ids[0, : lengths[0]].tolist(), skip_special_tokens=False) == text
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}) + [(text, "pos")] * 4)
    prepare_dataset(data(max_len=32), Path("ds"), seed=0)
    ds = ClassificationData("ds")
    rows = [(row, n) for name in ("train", "val") for row, n in zip(*ds.split(name)[:2])]
    assert all(ds.pad_id not in row[:n].tolist() for row, n in rows)


def test_prepare_writes_padded_ids_lengths_and_labels_that_decode_back_to_the_rows():
    rows = labelled_rows({"neg": 20, "pos": 20}) + [(" ".join(WORDS * 4), "pos")]
    write_csv("reviews.csv", rows)
    result = prepare_dataset(data(), Path("ds"), seed=0)
    assert {p.name for p in Path("ds").iterdir()} == {
        "tokenizer.json", "meta.json", *(f"{s}.{k}.npy" for s in ("train", "val") for k in ("ids", "lengths", "labels"))}
    meta = json.loads(Path("ds/meta.json").read_text())
    assert meta == result.meta
    for key in ("task", "labels", "num_classes", "max_len", "pad_id", "vocab_size", "eot_id", "special_tokens",
                "splits", "split", "sources", "fingerprint", "data", "seed", "created", "llmctl_version"):
        assert key in meta, key
    assert meta["task"] == "classification" and meta["pad_id"] == meta["eot_id"] == 0 and meta["max_len"] == 16
    assert meta["sources"]["files"] == 1 and meta["sources"]["rows"] == 41
    assert meta["splits"]["train"]["truncated"] + meta["splits"]["val"]["truncated"] == 1

    ds = ClassificationData("ds")
    assert (ds.labels, ds.num_classes, ds.max_len, ds.pad_id) == (["neg", "pos"], 2, 16, 0)
    assert ds.vocab_size == meta["vocab_size"] and ds.tokenizer_path == Path("ds/tokenizer.json")
    tok = load_tokenizer(ds.tokenizer_path)
    texts = {text: label for text, label in rows}
    seen = 0
    for name in ("train", "val"):
        ids, lengths, labels = ds.split(name)
        assert ids.dtype == np.int32 and lengths.dtype == np.int32 and labels.dtype == np.int64
        assert ids.shape == (meta["splits"][name]["examples"], 16)
        for row, n, y in zip(ids, lengths, labels):
            assert (row[n:] == ds.pad_id).all()
            text = tok.decode(row[:n].tolist())
            if n < 16:
                assert texts[text] == ds.labels[y]
            else:
                assert " ".join(WORDS * 4).startswith(text) and ds.labels[y] == "pos"
            seen += 1
    assert seen == 41


def test_a_rerun_with_the_same_inputs_is_skipped_and_a_changed_file_rebuilds():
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}))
    first = prepare_dataset(data(), Path("ds"), seed=0)
    before = Path("ds/train.ids.npy").stat().st_mtime_ns
    calls = []
    again = prepare_dataset(data(), Path("ds"), seed=0, on_progress=lambda *a: calls.append(a))
    assert again.skipped and again.meta == first.meta and calls == []
    assert Path("ds/train.ids.npy").stat().st_mtime_ns == before
    assert not prepare_dataset(data(), Path("ds"), seed=0, force=True).skipped
    assert not prepare_dataset(data(max_len=8), Path("ds"), seed=0).skipped
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 11}))
    assert not prepare_dataset(data(max_len=8), Path("ds"), seed=0).skipped


def test_a_damaged_split_file_rebuilds():
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}))
    prepare_dataset(data(), Path("ds"), seed=0)
    np.save("ds/val.labels.npy", np.zeros(1, dtype=np.int64))
    assert not prepare_dataset(data(), Path("ds"), seed=0).skipped
    Path("ds/val.ids.npy").unlink()
    with pytest.raises(LlmctlError, match=r"val\.ids\.npy: missing"):
        ClassificationData("ds").split("val")


def test_a_bad_input_leaves_the_earlier_dataset_dir_intact(in_tmp):
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}))
    prepare_dataset(data(), Path("ds"), seed=0)
    before = {p.name: p.read_bytes() for p in Path("ds").iterdir()}
    Path("reviews.csv").write_text(Path("reviews.csv").read_text() + "a,b,c\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"reviews\.csv:22: 3 field"):
        prepare_dataset(data(), Path("ds"), seed=0)
    assert {p.name: p.read_bytes() for p in Path("ds").iterdir()} == before
    assert sorted(p.name for p in in_tmp.iterdir()) == ["ds", "reviews.csv"]  # no staging dir left


def test_a_reused_tokenizer_gives_the_same_ids():
    write_csv("reviews.csv", labelled_rows({"neg": 10, "pos": 10}))
    prepare_dataset(data(), Path("a"), seed=0)
    meta = prepare_dataset(data(tokenizer="a/tokenizer.json"), Path("b"), seed=0).meta
    assert meta["tokenizer"]["trained"] is False
    for name in ("tokenizer.json", "train.ids.npy", "val.labels.npy"):
        assert Path("a", name).read_bytes() == Path("b", name).read_bytes()


def test_a_language_modelling_dataset_dir_is_not_classification_data():
    Path("corpus.txt").write_text(" ".join(WORDS * 50) + "\n", encoding="utf-8")
    prepare_dataset(DataConfig(sources=["corpus.txt"], vocab_size=300), Path("lm"), seed=0)
    with pytest.raises(LlmctlError, match=r"lm: a language-modelling dataset dir .*data\.task: classification"):
        ClassificationData("lm")
    with pytest.raises(LlmctlError, match="no such dataset dir"):
        ClassificationData("nowhere")


# --- the built-in data set --------------------------------------------------------------------------


def test_builtin_sentiment_is_the_packaged_csv_and_unknown_builtins_list_both():
    [(path, fmt, _)] = resolve_source_files(DataConfig(sources=[SENTIMENT]))
    assert path == sentiment_path() == Path(sentiment.__file__).with_name("sentiment.csv") and fmt == "csv"
    with pytest.raises(LlmctlError, match=r"unknown built-in corpus; the built-ins are builtin:stdlib .* and builtin:sentiment"):
        resolve_source_files(DataConfig(sources=["builtin:imdb"]))


def test_the_shipped_sentiment_csv_is_the_generators_output():
    shipped = sentiment_path().read_text(encoding="utf-8")
    assert shipped == sentiment.to_csv(sentiment.generate(6000, seed=0))
    rows = read_labelled_file(sentiment_path())
    assert len(rows) == len({text for text, _, _ in rows}) == 6000
    counts = {label: sum(r.label == label for r in rows) for label in sentiment.LABELS}
    assert min(counts.values()) > 2800


def rule(text: str) -> str:
    """The documented rule, read off the words: the last adjective's polarity, flipped by a "not" just before it."""
    words = re.findall(r"[a-z]+", text)
    at = max(i for i, w in enumerate(words) if w in sentiment.POSITIVE or w in sentiment.NEGATIVE)
    positive = (words[at] in sentiment.POSITIVE) != (words[at - 1] == "not")
    return "positive" if positive else "negative"


def bag_of_words_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]], steps: int = 400) -> tuple[float, float]:
    """(train, held-out) accuracy of logistic regression on unigram counts, fitted by gradient descent."""
    vocab = {w: i for i, w in enumerate(sorted({w for t, _ in train for w in re.findall(r"[a-z]+", t)}))}

    def features(rows):
        x = np.zeros((len(rows), len(vocab) + 1))
        x[:, -1] = 1.0  # bias
        for r, (text, _) in enumerate(rows):
            for w in re.findall(r"[a-z]+", text):
                if w in vocab:
                    x[r, vocab[w]] += 1
        return x, np.array([label == "positive" for _, label in rows], dtype=float)

    x, y = features(train)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        w -= 0.5 * (x.T @ (p - y) / len(y) + 1e-4 * w)
    accuracy = lambda x, y: float((((x @ w) > 0) == (y > 0.5)).mean())  # noqa: E731
    return accuracy(x, y), accuracy(*features(test))


def test_the_sentiment_rule_depends_on_word_order_so_a_bag_of_words_stays_near_chance():
    rows = [(r.text, r.label) for r in read_labelled_file(sentiment_path())]
    assert all(rule(text) == label for text, label in rows)  # the documented rule explains every label
    fit, held_out = bag_of_words_accuracy(rows[:4800], rows[4800:])
    assert held_out <= 0.6 and fit <= 0.65, (fit, held_out)
    # The same fit does learn a label that word counts do carry, so chance above is the data, not the fitter.
    counted = [(text, "positive" if "great" in text.split() else "negative") for text, _ in rows]
    assert bag_of_words_accuracy(counted[:4800], counted[4800:])[1] >= 0.95
    # The same words in order: flipping the last clause's "not" flips the label.
    text = "the plot was good but the acting was not great"
    assert rule(text) == "negative" and rule(text.replace("not great", "great")) == "positive"
