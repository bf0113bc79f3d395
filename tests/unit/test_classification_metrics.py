"""Classification metrics against hand-computed figures; the rich tables, the confusion PNG, predictions JSONL."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from llmctl.errors import LlmctlError
from llmctl.cli.eval_tables import confusion_table, per_class_table
from llmctl.evaluation.classification import (
    classification_metrics,
    f1_key_figures,
    prediction_row,
    save_confusion_png,
    write_predictions_jsonl,
)

# Binary, 4 neg and 6 pos.           predicted neg  pos
#   true neg: 0 0 0 1                           3    1
#   true pos: 1 1 1 1 0 0                       2    4
# pos: P = 4/(4+1) = 4/5,  R = 4/6 = 2/3,  F1 = 2·4/(2·4+1+2) = 8/11
# neg: P = 3/(3+2) = 3/5,  R = 3/4,        F1 = 2·3/(2·3+2+1) = 2/3
# accuracy 7/10; macro P = (3/5+4/5)/2 = 7/10, R = (3/4+2/3)/2 = 17/24, F1 = (2/3+8/11)/2 = 23/33
# weighted (0.4, 0.6): P = 0.4·3/5+0.6·4/5 = 18/25, R = 0.4·3/4+0.6·2/3 = 7/10, F1 = 0.4·2/3+0.6·8/11 = 116/165
BINARY_LABELS = ["neg", "pos"]
BINARY_TRUE = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
BINARY_PRED = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]


def close(value: float, exact: F | float) -> bool:
    return value == pytest.approx(float(exact), abs=1e-12)


def render(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


@pytest.fixture
def binary() -> dict:
    return classification_metrics(BINARY_TRUE, BINARY_PRED, BINARY_LABELS)


def test_binary_metrics_match_hand_computed_values(binary):
    assert binary["examples"] == 10
    assert binary["labels"] == ["neg", "pos"]
    assert binary["confusion"] == [[3, 1], [2, 4]]
    assert close(binary["accuracy"], F(7, 10))
    pos, neg = binary["per_class"]["pos"], binary["per_class"]["neg"]
    assert close(pos["precision"], F(4, 5)) and close(pos["recall"], F(2, 3)) and close(pos["f1"], F(8, 11))
    assert close(neg["precision"], F(3, 5)) and close(neg["recall"], F(3, 4)) and close(neg["f1"], F(2, 3))
    assert (neg["support"], pos["support"]) == (4, 6)
    assert close(binary["macro"]["precision"], F(7, 10))
    assert close(binary["macro"]["recall"], F(17, 24))
    assert close(binary["macro"]["f1"], F(23, 33))
    assert close(binary["weighted"]["precision"], F(18, 25))
    assert close(binary["weighted"]["recall"], F(7, 10))  # weighted recall is always the accuracy
    assert close(binary["weighted"]["f1"], F(116, 165))


def test_three_class_metrics_match_hand_computed_values():
    # Confusion (rows true, columns predicted), 6 examples of each class:
    #        a  b  c
    #   a    5  1  0      a: P = 5/7, R = 5/6, F1 = 2·5/(7+6) = 10/13
    #   b    2  3  1      b: P = 3/6, R = 3/6, F1 = 6/12      = 1/2
    #   c    0  2  4      c: P = 4/5, R = 4/6, F1 = 8/(5+6)   = 8/11
    y_true = [0] * 6 + [1] * 6 + [2] * 6
    y_pred = [0, 0, 0, 0, 0, 1] + [0, 0, 1, 1, 1, 2] + [1, 1, 2, 2, 2, 2]
    m = classification_metrics(np.array(y_true), np.array(y_pred), ["a", "b", "c"])
    assert m["confusion"] == [[5, 1, 0], [2, 3, 1], [0, 2, 4]]
    assert close(m["accuracy"], F(12, 18))
    expected = {"a": (F(5, 7), F(5, 6), F(10, 13)), "b": (F(1, 2), F(1, 2), F(1, 2)), "c": (F(4, 5), F(2, 3), F(8, 11))}
    for label, (p, r, f1) in expected.items():
        got = m["per_class"][label]
        assert close(got["precision"], p) and close(got["recall"], r) and close(got["f1"], f1), label
        assert got["support"] == 6
    assert close(m["macro"]["precision"], (F(5, 7) + F(1, 2) + F(4, 5)) / 3)
    assert close(m["macro"]["recall"], F(12, 18))
    assert close(m["macro"]["f1"], (F(10, 13) + F(1, 2) + F(8, 11)) / 3)
    # Balanced supports: weighted averages equal macro ones.
    for key in ("precision", "recall", "f1"):
        assert close(m["weighted"][key], m["macro"][key])


def test_class_never_predicted_has_precision_zero():
    # c (id 2) is never predicted: P = 0 (0/0 counted as 0), R = 0/2 = 0, F1 = 0.
    # b: predicted 3 times, once rightly: P = 1/3, R = 1/1, F1 = 2/(3+1) = 1/2.
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert close(m["per_class"]["b"]["precision"], F(1, 3)) and close(m["per_class"]["b"]["f1"], F(1, 2))
    assert close(m["macro"]["precision"], (1 + F(1, 3) + 0) / 3)


def test_class_without_support_counts_in_macro_but_not_weighted():
    # b has no true examples but is predicted once: P = 0/1 = 0, R = 0 (no support), F1 = 0/(1+0) = 0.
    # a: P = 1/1, R = 1/2, F1 = 2/(1+2) = 2/3.  Macro F1 = (2/3 + 0)/2 = 1/3; weighted = 1·2/3 + 0·0 = 2/3.
    m = classification_metrics([0, 0], [0, 1], ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert close(m["macro"]["f1"], F(1, 3))
    assert close(m["weighted"]["f1"], F(2, 3))
    # A label absent from both y_true and y_pred still counts (all zeros) in the macro mean.
    m = classification_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert close(m["macro"]["precision"], (1 + F(1, 2) + 0) / 3)


def test_perfect_predictions_score_one_everywhere():
    y = [0, 1, 2, 2, 1, 0, 2]
    m = classification_metrics(y, y, ["x", "y", "z"])
    assert m["accuracy"] == 1.0
    for avg in ("macro", "weighted"):
        assert m[avg] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert all(c["precision"] == c["recall"] == c["f1"] == 1.0 for c in m["per_class"].values())
    assert m["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_confusion_rows_are_true_classes_and_columns_predicted():
    # Three true "a" all predicted "b": the count sits in row a, column b.
    m = classification_metrics([0, 0, 0], [1, 1, 1], ["a", "b"])
    assert m["confusion"] == [[0, 3], [0, 0]]
    assert [sum(row) for row in m["confusion"]] == [m["per_class"][k]["support"] for k in ("a", "b")]


def test_macro_and_weighted_differ_on_imbalanced_data():
    # 9 "major", 1 "minor"; everything predicted "major".
    # major: P = 9/10, R = 9/9 = 1, F1 = 2·9/(10+9) = 18/19;  minor: never predicted, P = R = F1 = 0.
    # macro:    P = 9/20,          R = 1/2,       F1 = 9/19
    # weighted: P = 0.9·9/10 = 81/100, R = 9/10, F1 = 0.9·18/19 = 81/95
    m = classification_metrics([0] * 9 + [1], [0] * 10, ["major", "minor"])
    assert close(m["accuracy"], F(9, 10))
    assert close(m["macro"]["precision"], F(9, 20))
    assert close(m["macro"]["recall"], F(1, 2))
    assert close(m["macro"]["f1"], F(9, 19))
    assert close(m["weighted"]["precision"], F(81, 100))
    assert close(m["weighted"]["recall"], F(9, 10))
    assert close(m["weighted"]["f1"], F(81, 95))


def test_metrics_agree_with_counting_definition_on_random_data():
    rng = np.random.default_rng(0)
    K = 5
    y_true, y_pred = rng.integers(0, K, 300), rng.integers(0, K - 1, 300)  # class 4 is never predicted
    m = classification_metrics(y_true, y_pred, [f"c{k}" for k in range(K)])
    for k in range(K):
        tp = int(np.sum((y_true == k) & (y_pred == k)))
        fp = int(np.sum((y_true != k) & (y_pred == k)))
        fn = int(np.sum((y_true == k) & (y_pred != k)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        got = m["per_class"][f"c{k}"]
        assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
        assert got["f1"] == pytest.approx(f1) and got["support"] == tp + fn
    assert m["accuracy"] == pytest.approx(float(np.mean(y_true == y_pred)))
    assert sum(map(sum, m["confusion"])) == 300


def test_metrics_are_plain_json_values(binary):
    assert json.loads(json.dumps(binary)) == binary


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        ([0, 1, 1], [0, 1], ["a", "b"], "y_true has 3 examples but y_pred has 2"),
        ([0, 2], [0, 1], ["a", "b"], r"y_true\[1\] = 2 is not a class id: labels has 2 classes \(ids 0..1\)"),
        ([0, 1], [-1, 1], ["a", "b"], r"y_pred\[0\] = -1 is not a class id"),
        ([0, 1], [0, 0.5], ["a", "b"], r"y_pred\[1\] = 0.5 is not a whole-number class id"),
        ([0, 1], ["a", "b"], ["a", "b"], "y_pred must hold integer class ids"),
        ([[0, 1]], [[0, 1]], ["a", "b"], "y_true must be 1-D"),
        ([], [], ["a", "b"], "no examples to score"),
        ([0], [0], [], "labels is empty"),
        ([0], [0], ["a", "a"], "labels lists 'a' twice"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(y_true, y_pred, labels, message):
    with pytest.raises(ValueError, match=message) as info:
        classification_metrics(y_true, y_pred, labels)
    assert isinstance(info.value, LlmctlError)  # so the CLI prints it and exits 2


def test_whole_number_floats_are_accepted_as_class_ids():
    m = classification_metrics(np.array([0.0, 1.0]), np.array([0.0, 0.0]), ["a", "b"])
    assert m["confusion"] == [[1, 0], [1, 0]]


def test_key_figures_are_accuracy_and_macro_averages(binary):
    assert f1_key_figures(binary) == {
        "val_accuracy": binary["accuracy"],
        "val_f1": binary["macro"]["f1"],
        "val_precision": binary["macro"]["precision"],
        "val_recall": binary["macro"]["recall"],
    }
    assert close(f1_key_figures(binary)["val_f1"], F(23, 33))


def test_confusion_table_renders_labels_and_counts(binary):
    text = render(confusion_table(binary))
    assert "rows: true labels" in text and "true \\ predicted" in text
    lines = text.splitlines()
    neg_row = next(line for line in lines if line.strip("│ ").startswith("neg"))
    pos_row = next(line for line in lines if line.strip("│ ").startswith("pos"))
    assert [c.strip() for c in neg_row.split("│")[2:4]] == ["3", "1"]
    assert [c.strip() for c in pos_row.split("│")[2:4]] == ["2", "4"]


def test_per_class_table_renders_like_a_classification_report(binary):
    text = render(per_class_table(binary))
    for needle in ("neg", "pos", "precision", "recall", "f1", "support", "accuracy", "macro avg", "weighted avg"):
        assert needle in text
    for number in ("0.6000", "0.7500", "0.8000", "0.6667", "0.7273", "0.7083", "0.6970", "0.7200", "0.7030"):
        assert number in text  # 3/5, 3/4, 4/5, 2/3, 8/11, 17/24, 23/33, 18/25, 116/165


def test_tables_show_label_names_verbatim_not_as_markup():
    m = classification_metrics([0, 1], [0, 1], ["[bold]", "[/x]"])
    for table in (confusion_table(m), per_class_table(m)):
        text = render(table)
        assert "[bold]" in text and "[/x]" in text


def test_confusion_png_is_a_drawn_png_written_atomically(binary, tmp_path):
    from matplotlib.image import imread

    path = save_confusion_png(binary, tmp_path / "plots" / "confusion.png", title="val split")
    assert path == tmp_path / "plots" / "confusion.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    pixels = imread(path)  # (H, W, channels) floats in [0, 1]
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 3
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temp file left behind


def test_confusion_png_copes_with_many_classes_and_an_all_zero_matrix(tmp_path):
    labels = [f"class-{k}" for k in range(12)]
    m = classification_metrics(list(range(12)) * 2, [0] * 24, labels)
    assert save_confusion_png(m, tmp_path / "many.png").read_bytes()[:4] == b"\x89PNG"
    m["confusion"] = [[0] * 12 for _ in range(12)]  # vmax must not collapse to 0
    assert save_confusion_png(m, tmp_path / "zeros.png").stat().st_size > 0


def test_prediction_row_picks_argmax_and_rounds_probabilities():
    row = prediction_row("not good", [0.1234567891, 0.8765432109], ["neg", "pos"], true_label=0)
    assert row == {
        "text": "not good",
        "label": "pos",
        "probabilities": {"neg": 0.123457, "pos": 0.876543},
        "true_label": "neg",
    }
    assert "true_label" not in prediction_row("good", np.array([0.9, 0.1], dtype=np.float32), ["neg", "pos"])
    assert prediction_row("ok", [0.2, 0.8], ["neg", "pos"], true_label="pos")["true_label"] == "pos"


@pytest.mark.parametrize(
    ("probs", "true_label", "message"),
    [
        ([0.5, 0.3, 0.2], None, "got 3 probabilities for 2 labels"),
        ([2.3, -1.1], None, "not a distribution"),
        ([0.7, 0.7], None, "sum to 1.4"),
        ([float("nan"), 1.0], None, "not a distribution"),
        ([0.5, 0.5], 2, "true_label 2 is not a class id"),
        ([0.5, 0.5], "meh", "true_label 'meh' is not one of the labels"),
    ],
)
def test_prediction_row_refuses_what_is_not_a_distribution_over_the_labels(probs, true_label, message):
    with pytest.raises(ValueError, match=message):
        prediction_row("x", probs, ["neg", "pos"], true_label=true_label)


def test_predictions_jsonl_round_trips(tmp_path):
    labels = ["neg", "neutral", "pos"]
    logits = np.random.default_rng(1).normal(size=(5, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # (5, 3) softmax
    texts = ["good", "not good", "café ☕", 'a "quoted"\nline', ""]
    rows = (prediction_row(t, p, labels, true_label=i % 3) for i, (t, p) in enumerate(zip(texts, probs)))
    path = tmp_path / "out" / "predictions.jsonl"
    assert write_predictions_jsonl(path, rows) == 5
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    for i, (line, text, p) in enumerate(zip(lines, texts, probs)):
        row = json.loads(line)
        assert row["text"] == text
        assert row["label"] == labels[int(np.argmax(p))]
        assert row["true_label"] == labels[i % 3]
        assert list(row["probabilities"]) == labels
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert [p.name for p in path.parent.iterdir()] == ["predictions.jsonl"]


def test_predictions_jsonl_with_no_rows_writes_an_empty_file(tmp_path):
    assert write_predictions_jsonl(tmp_path / "p.jsonl", []) == 0
    assert (tmp_path / "p.jsonl").read_bytes() == b""


def test_predictions_jsonl_refuses_rows_json_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="prediction row 1 cannot be written as JSON"):
        write_predictions_jsonl(tmp_path / "p.jsonl", [{"p": 0.5}, {"p": float("nan")}])
    assert not (tmp_path / "p.jsonl").exists()


def test_module_imports_neither_torch_nor_plotting_libraries():
    code = (
        "import sys, llmctl.evaluation.classification; "
        "print([m for m in ('torch', 'matplotlib', 'rich') if m in sys.modules])"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "[]"
