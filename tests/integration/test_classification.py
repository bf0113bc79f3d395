"""Sequence classification through the real CLI: the shipped sentiment-rnn recipe trains past a stated
macro-F1 and beats a bag-of-words baseline fitted here; eval scores files, writes predictions and a
confusion PNG and gates CI; multi-class CSV data with class weights and early stopping on accuracy;
tune maximises val_f1; recipes that mix up tasks exit 2."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import assert_clean_failure, metrics, run_cli

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sentiment-rnn.yaml"
# What the shipped recipe must reach on its own val split, and by how much it must beat bag-of-words.
MIN_MACRO_F1 = 0.95
MIN_MARGIN_OVER_BAG_OF_WORDS = 0.30


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipe, trained as shipped (10 epochs of a 64-unit RNN: seconds)."""
    root = tmp_path_factory.mktemp("sentiment")
    shutil.copy(RECIPE, root / "sentiment-rnn.yaml")
    run_cli(root, "train", "sentiment-rnn.yaml", timeout=600)
    return root


def bag_of_words_macro_f1(dataset: Path) -> float:
    """Logistic regression on token counts (full-batch gradient descent), scored by macro-F1 on val."""
    from llmctl.tasks.classification.data import ClassificationData
    from llmctl.evaluation.classification import classification_metrics

    data = ClassificationData(dataset)

    def counts(split: str) -> tuple[np.ndarray, np.ndarray]:
        ids, lengths, labels = (np.asarray(a) for a in data.split(split))
        x = np.zeros((len(labels), data.vocab_size))
        for row, (seq, n) in enumerate(zip(ids, lengths)):
            np.add.at(x[row], seq[:n], 1.0)
        return x, labels.astype(np.float64)

    x, y = counts("train")
    xv, yv = counts("val")
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(600):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        w -= 0.5 * (x.T @ (p - y) / len(y) + 1e-4 * w)
        b -= 0.5 * float(np.mean(p - y))
    predicted = ((xv @ w + b) > 0).astype(int)
    return classification_metrics(yv.astype(int), predicted, data.labels)["macro"]["f1"]


def test_the_sentiment_recipe_learns_word_order_that_bag_of_words_cannot(sentiment: Path) -> None:
    rows = metrics(sentiment / "runs/sentiment-rnn")
    evals = [r for r in rows if "val_f1" in r]
    assert evals and all({"val_loss", "val_accuracy", "val_precision", "val_recall", "best_val_f1"} <= set(r) for r in evals)
    assert rows[-1]["step"] == 1500  # train.epochs 10 x 4,800 examples / batch 32
    report = json.loads(run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--json").stdout)
    assert report["examples"] == 1200 and report["labels"] == ["negative", "positive"]
    rnn_f1 = report["macro"]["f1"]
    bow_f1 = bag_of_words_macro_f1(sentiment / "data/sentiment-rnn")
    assert rnn_f1 >= MIN_MACRO_F1, rnn_f1
    assert rnn_f1 - bow_f1 >= MIN_MARGIN_OVER_BAG_OF_WORDS, (rnn_f1, bow_f1)
    assert max(r["val_f1"] for r in evals) == pytest.approx(rnn_f1, abs=1e-6)  # model/ is the best evaluation


def test_eval_scores_a_labelled_file_writes_predictions_and_a_confusion_png_and_gates(sentiment: Path) -> None:
    (sentiment / "reviews.csv").write_text(
        "text,label\n"
        "the plot was good but the acting was bad,negative\n"
        "the plot was bad but the acting was not bad,positive\n"
        "the music was great yet the story was not good,negative\n", encoding="utf-8")
    (sentiment / "new.jsonl").write_text(json.dumps({"text": "the story was bad but the music was great"}) + "\n",
                                         encoding="utf-8")
    proc = run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--data", "reviews.csv", "--predict", "new.jsonl",
                   "--out", "report", "--json")
    report = json.loads(proc.stdout)
    assert report["examples"] == 3 and sum(map(sum, report["confusion"])) == 3
    png = (sentiment / "report/confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    saved = json.loads((sentiment / "report/eval.json").read_text())
    assert saved["macro"] == report["macro"]
    predicted = [json.loads(line) for line in (sentiment / "report/predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 1 and predicted[0]["label"] in ("negative", "positive")
    assert sum(predicted[0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert predicted[0]["label"] == max(predicted[0]["probabilities"], key=predicted[0]["probabilities"].get)
    gate = run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--min-f1", "1.01", check=False)
    assert gate.returncode == 2  # out of range: a usage error
    gate = run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--data", "reviews.csv", "--min-accuracy", "1.0",
                   "--out", "report2", check=False)
    assert gate.returncode in (0, 3) and ("gate failed" in gate.stderr) == (gate.returncode == 3)
    (sentiment / "bad.csv").write_text("text,label\nthe plot was good,great\n", encoding="utf-8")
    assert_clean_failure(run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--data", "bad.csv", check=False),
                         2, "bad.csv, line 2", "'great'")


def test_compare_puts_a_classifier_its_int8_twin_and_its_onnx_export_side_by_side(sentiment: Path) -> None:
    run_cli(sentiment, "compress", "runs/sentiment-rnn/model", "--quantize", "int8", "-o", "out/int8")
    run_cli(sentiment, "export", "runs/sentiment-rnn/model", "-o", "out/onnx")
    report = json.loads(run_cli(sentiment, "eval", "--compare", "runs/sentiment-rnn/model", "out/int8", "out/onnx",
                                "--json").stdout)
    rows = {r["name"]: r for r in report["rows"]}
    assert report["examples"] == 1200 and [r["backend"] for r in report["rows"]] == ["torch", "torch-int8", "onnxruntime"]
    assert rows["out/int8"]["size_bytes"] < 0.5 * rows["runs/sentiment-rnn/model"]["size_bytes"]
    assert all(r["macro_f1"] >= MIN_MACRO_F1 and r["forward_ms"] > 0 for r in report["rows"])


def _three_class_csv(path: Path, rows: int, seed: int) -> None:
    """Topic by keyword, with an imbalanced class: sports 60%, music 30%, food 10%."""
    rng = random.Random(seed)
    words = {"sports": ["goal", "match", "team"], "music": ["song", "band", "album"], "food": ["bread", "soup", "cake"]}
    filler = "the a this that was is very quite really new old".split()
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.choices(list(words), weights=[6, 3, 1])[0]
        text = " ".join(rng.choice(filler) for _ in range(rng.randint(2, 6)) ) + " " + rng.choice(words[label])
        lines.append(f"{text},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_users_multiclass_csv_trains_a_gru_with_class_weights_and_early_stopping(tmp_path: Path) -> None:
    shutil.copy(RECIPE, tmp_path / "sentiment-rnn.yaml")
    _three_class_csv(tmp_path / "topics.csv", 600, seed=1)
    proc = run_cli(tmp_path, "train", "sentiment-rnn.yaml", "data.sources=topics.csv", "data.dir=data/topics",
                   "model.family=gru", "model.bidirectional=true", "train.class_weights=balanced",
                   "train.monitor=val_accuracy", "train.patience=2", "train.eval_every=15", "train.epochs=8", "--json")
    result = json.loads(proc.stdout)
    assert result["task"] == "classification" and result["monitor"] == "val_accuracy"
    config = json.loads((tmp_path / "runs/sentiment-rnn/model/config.json").read_text())
    assert config["family"] == "gru" and config["labels"] == ["food", "music", "sports"] and config["num_classes"] == 3
    report = json.loads(run_cli(tmp_path, "eval", "runs/sentiment-rnn/model", "--json").stdout)
    assert report["accuracy"] >= 0.9 and report["per_class"]["food"]["support"] >= 5
    assert report["accuracy"] == pytest.approx(result["best_monitor"], abs=1e-6)
    # Keywords make val accuracy reach its best early; patience 2 then stops the run before 8 epochs.
    rows = [r for r in metrics(tmp_path / "runs/sentiment-rnn") if "val_accuracy" in r]
    assert result["stopped_early"] and rows[-1]["step"] < 8 * 480 // 32
    best = max(r["val_accuracy"] for r in rows)
    assert rows[-3]["best_val_accuracy"] == best and all(r["val_accuracy"] <= best for r in rows[-2:])


def test_tune_maximises_val_f1_over_classifier_recipes(tmp_path: Path) -> None:
    recipe = RECIPE.read_text(encoding="utf-8") + """
tune:
  objective: val_f1
  direction: maximize
  trials: 2
  sampler: random
  pruner: none
  space:
    model.family: {type: categorical, choices: [rnn, gru]}
    train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""
    (tmp_path / "sentiment-tune.yaml").write_text(recipe.replace("epochs: 10 ", "epochs: 2 "), encoding="utf-8")
    proc = run_cli(tmp_path, "tune", "sentiment-tune.yaml", "--json", timeout=600)
    study = json.loads(proc.stdout)
    assert study["objective"] == "val_f1" and study["direction"] == "maximize"
    best_yaml = (tmp_path / "runs/sentiment-tune/best.yaml").read_text()
    assert "family:" in best_yaml and study["best"]["value"] >= 0.5


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.family=lstm", "model.family lstm is a classifier: it needs data.task: classification"),
        ("train.monitor=val_f1", "train.monitor val_f1 needs data.task: classification"),
    ],
)
def test_a_classifier_setting_in_a_language_model_recipe_exits_2(workdir: Path, override: str, needle: str) -> None:
    assert_clean_failure(run_cli(workdir, "train", "tiny.yaml", override, check=False), 2, needle)


def test_classifier_eval_options_on_a_language_model_exit_2(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    assert_clean_failure(run_cli(workdir, "eval", "runs/tiny/model", "--predict", "x.csv", check=False), 2,
                         "--predict", "language model")
