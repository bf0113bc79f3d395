"""`llmctl prepare` on classification recipes through the real CLI: the shipped sentiment recipe, a user's
CSV by one override, and bad labelled files that exit 2 with file:line and leave no dataset dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import assert_clean_failure, run_cli

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sentiment-rnn.yaml"


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    shutil.copy(RECIPE, tmp_path / "sentiment-rnn.yaml")
    return tmp_path


def test_prepare_the_sentiment_recipe_writes_a_stratified_classification_dataset(recipe_dir: Path) -> None:
    proc = run_cli(recipe_dir, "prepare", "sentiment-rnn.yaml", "--json")
    info = json.loads(proc.stdout)
    assert info["dataset_dir"] == "data/sentiment-rnn" and info["task"] == "classification" and not info["skipped"]
    assert info["labels"] == ["negative", "positive"] and info["num_classes"] == 2 and info["split"] == "stratified"
    assert info["train_examples"] == 4800 and info["val_examples"] == 1200 and info["max_len"] == 32
    assert info["truncated"] == {"train": 0, "val": 0}
    val = info["class_counts"]["val"]
    assert sum(val.values()) == 1200 and abs(val["negative"] - val["positive"]) < 60
    assert 260 < info["vocab_size"] < 1000  # far below the recipe's 10000: the corpus has few words
    assert "1,200 val examples (stratified), 2 classes" in proc.stderr and "val:" in proc.stderr

    ids = np.load(recipe_dir / "data/sentiment-rnn/train.ids.npy")
    assert ids.shape == (4800, 32) and ids.dtype == np.int32
    again = run_cli(recipe_dir, "prepare", "sentiment-rnn.yaml")
    assert "up to date" in again.stderr


def test_one_override_points_the_recipe_at_a_users_csv(recipe_dir: Path) -> None:
    rows = [(f"review number {i} says {'great' if i % 3 else 'awful'} things", 1 + i % 3 * 4) for i in range(60)]
    text = "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows)
    (recipe_dir / "reviews.csv").write_text(text, encoding="utf-8")
    proc = run_cli(recipe_dir, "prepare", "sentiment-rnn.yaml", "data.sources=reviews.csv", "--json")
    info = json.loads(proc.stdout)
    assert info["labels"] == ["1", "5", "9"]  # integer labels, in numeric order
    assert info["class_counts"]["val"] == {"1": 4, "5": 4, "9": 4} and info["train_examples"] == 48


BAD_INPUTS = {
    "missing label column": ("text,stars\ngood,5\nbad,1\n", "reviews.csv:1: no label column 'label' (columns: text, stars)"),
    "empty text": ('text,label\ngood,pos\n"  ",neg\nbad,neg\n', "reviews.csv:3: the text ('text') is empty"),
    "ragged row": ("text,label\ngood,pos\nbad,neg\nnot good, not bad,neg\n", "reviews.csv:4: 3 field(s) where the header has 2"),
    # The two files: 5 fields on line 7 (and 2 on line 8) where the header has 3; a quote open on line 3.
    "ragged rows after good ones": (
        "text,label,note\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'},x\n" for i in range(5))
        + "a,b,c,d,e\na,b\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'},x\n" for i in range(30)),
        "reviews.csv:7: 5 field(s) where the header has 3",
    ),
    "quote left open": (
        "text,label\ngood,pos\n\"an open quote,neg\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(30)),
        "reviews.csv:3: a quote opened on this line is never closed",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.replace(" ", "-"))
def test_a_bad_labelled_file_exits_2_naming_file_and_line_and_writes_nothing(recipe_dir: Path, case: str) -> None:
    body, message = BAD_INPUTS[case]
    (recipe_dir / "reviews.csv").write_text(body, encoding="utf-8")
    proc = run_cli(recipe_dir, "prepare", "sentiment-rnn.yaml", "data.sources=reviews.csv", check=False)
    assert_clean_failure(proc, 2, message)
    assert not (recipe_dir / "data").exists()


def test_a_val_label_never_seen_in_train_exits_2_naming_it(recipe_dir: Path) -> None:
    (recipe_dir / "reviews.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n", encoding="utf-8")
    (recipe_dir / "val.csv").write_text("text,label\ngreat,pos\nmeh,mixed\n", encoding="utf-8")
    proc = run_cli(recipe_dir, "prepare", "sentiment-rnn.yaml", "data.sources=reviews.csv", "data.val_sources=val.csv",
                   "--json", check=False)
    assert_clean_failure(proc, 2, "val.csv:3: label 'mixed' never occurs in train")
    assert json.loads(proc.stdout)["error"]["kind"] == "bad_input"
    assert not (recipe_dir / "data").exists()


def test_a_small_own_dataset_is_evaluated_once_an_epoch_not_once_at_the_end(tmp_path: Path) -> None:
    # The README's one-override path: the shipped recipe evaluates every 150 steps, written for 4,800 sentences;
    # 240 rows give 192 train rows, 6 steps an epoch, 60 steps in 10 epochs.
    run_cli(tmp_path, "recipes", "cp", "sentiment-rnn", "mine.yaml")
    words = ["good", "bad", "great", "dull", "fine", "awful"]
    rows = [(f"the film was {words[i % 6]} and {words[(i * 5) % 6]}", "pos" if i % 6 in (0, 2, 4) else "neg") for i in range(240)]
    (tmp_path / "toy.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    proc = run_cli(tmp_path, "train", "mine.yaml", "data.sources=toy.csv", "--json")
    assert "train.eval_every (150) is beyond this run's 60 steps" in proc.stderr
    assert "evaluating every 6 steps (once an epoch)" in proc.stderr
    assert json.loads(proc.stdout)["eval_every"] == 6
    rows = [json.loads(line) for line in (tmp_path / "runs/mine/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == list(range(6, 61, 6))
