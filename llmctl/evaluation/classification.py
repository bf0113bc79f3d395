"""Classification evaluation: accuracy, precision, recall and F1, the confusion matrix, predictions.

Pure numpy. The conventions follow scikit-learn with `zero_division=0`: a class
that is never predicted has precision 0, a class with no examples has recall 0,
and F1 is 2·TP / (2·TP + FP + FN), 0 when that is 0/0. Macro averages weigh every
class of `labels` equally (classes absent from the data included); weighted
averages weigh each class by its support (number of true examples).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.artifacts import write_atomic
from llmctl.errors import LlmctlError

PROBABILITY_DIGITS = 6
# Softmax outputs sum to 1 up to float error (float16 and quantized models drift
# by ~1e-3); anything further off is almost certainly logits passed by mistake.
_PROBABILITY_SUM_TOLERANCE = 1e-2


class ClassificationInputError(LlmctlError, ValueError):
    """Labels, class ids or probabilities that cannot be scored; a ValueError for Python callers."""


def _check_labels(labels: Sequence[str]) -> list[str]:
    names = [str(label) for label in labels]
    if not names:
        raise ClassificationInputError("labels is empty: need the name of at least one class.")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ClassificationInputError(f"labels lists {name!r} twice: class names must be unique.")
        seen.add(name)
    return names


def _class_ids(values: Sequence[int] | np.ndarray, name: str, n_classes: int) -> np.ndarray:
    """`values` as a 1-D int64 array of class ids in [0, n_classes), or a ClassificationInputError."""
    ids = np.asarray(values)
    if ids.ndim != 1:
        raise ClassificationInputError(f"{name} must be 1-D (one class id per example), got shape {ids.shape}.")
    if ids.dtype.kind == "f":
        # A label column read through floats (e.g. 0.0/1.0) is fine; 0.7 is not a class id.
        bad = ~np.isfinite(ids) | (ids != np.round(ids))
        if bad.any():
            i = int(np.argmax(bad))
            raise ClassificationInputError(f"{name}[{i}] = {ids[i].item()!r} is not a whole-number class id.")
    elif ids.dtype.kind not in "iu" and ids.size:
        raise ClassificationInputError(f"{name} must hold integer class ids, got dtype {ids.dtype}.")
    ids = ids.astype(np.int64)
    out = (ids < 0) | (ids >= n_classes)
    if out.any():
        i = int(np.argmax(out))
        raise ClassificationInputError(
            f"{name}[{i}] = {ids[i]} is not a class id: labels has {n_classes} classes (ids 0..{n_classes - 1})."
        )
    return ids


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, per-class/macro/weighted precision, recall and F1, and the confusion matrix.

    `y_true` and `y_pred` are class ids indexing `labels`. The confusion matrix
    has one row per true class and one column per predicted class, in label order.
    """
    names = _check_labels(labels)
    K = len(names)
    t = _class_ids(y_true, "y_true", K)
    p = _class_ids(y_pred, "y_pred", K)
    if len(t) != len(p):
        raise ClassificationInputError(
            f"y_true has {len(t)} examples but y_pred has {len(p)}: need one prediction per example."
        )
    n = len(t)
    if n == 0:
        raise ClassificationInputError("no examples to score: y_true and y_pred are empty.")

    cm = np.bincount(t * K + p, minlength=K * K).reshape(K, K)  # (true, predicted)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)  # (K,) examples predicted as each class
    support = cm.sum(axis=1)  # (K,) examples truly of each class

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(K), where=den > 0)

    precision = ratio(tp, predicted)
    recall = ratio(tp, support)
    f1 = ratio(2 * tp, predicted + support)  # = 2PR/(P+R), and 0 where that is 0/0
    w = support / n

    return {
        "examples": n,
        "accuracy": float(tp.sum() / n),
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float(w @ precision), "recall": float(w @ recall), "f1": float(w @ f1)},
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(names)
        },
        "confusion": cm.tolist(),
        "labels": names,
    }


def f1_key_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat figures an eval row of metrics.jsonl carries: accuracy and macro precision, recall, F1."""
    macro = metrics["macro"]
    return {
        "val_accuracy": metrics["accuracy"],
        "val_f1": macro["f1"],
        "val_precision": macro["precision"],
        "val_recall": macro["recall"],
    }


def save_confusion_png(metrics: dict[str, Any], path: Path, title: str | None = None) -> Path:
    """Draw the confusion matrix (counts in each cell, true labels down, predicted across) to a PNG, atomically."""
    buffer = io.BytesIO()
    confusion_figure(metrics, title).savefig(buffer, format="png", dpi=100)
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path


def confusion_figure(metrics: dict[str, Any], title: str | None = None) -> Any:
    """The confusion matrix as a matplotlib Figure, its colour bar labelled with what the colours count."""
    # A bare Figure renders through Agg without pyplot, so no display is needed and the
    # process-wide backend (matplotlib.use) stays the caller's: safe in a server thread or a notebook.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = metrics["labels"]
    cm = np.asarray(metrics["confusion"])  # (true, predicted)
    K = len(names)
    side = min(3.0 + 0.6 * K, 20.0)  # inches: room for the labels, bounded for many classes
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, never 2.5
    colorbar.set_label("examples in the cell")
    ax.set_xticks(range(K), labels=names, rotation=45 if K > 4 else 0, ha="right" if K > 4 else "center")
    ax.set_yticks(range(K), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix ({metrics['examples']} examples)")
    if K <= 30:  # beyond that the numbers no longer fit their cells
        threshold = cm.max() / 2
        for i in range(K):
            for j in range(K):
                colour = "white" if cm[i, j] > threshold else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=9)
    return fig


def prediction_row(
    text: str,
    probs: Sequence[float] | np.ndarray,
    labels: Sequence[str],
    true_label: str | int | None = None,
) -> dict[str, Any]:
    """One predictions.jsonl row: the text, the argmax label and each label's probability (6 digits).

    `true_label` (a name or a class id) is added as "true_label" when given.
    """
    names = [str(label) for label in labels]
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(names),):
        raise ClassificationInputError(
            f"got {p.size} probabilities for {len(names)} labels: need one per label, in label order."
        )
    if not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > _PROBABILITY_SUM_TOLERANCE:
        raise ClassificationInputError(
            f"probabilities {p.tolist()} are not a distribution (non-negative, summing to 1; these sum to "
            f"{p.sum():.4g}): pass softmax outputs, not logits."
        )
    row: dict[str, Any] = {
        "text": text,
        "label": names[int(np.argmax(p))],
        "probabilities": {name: round(float(q), PROBABILITY_DIGITS) for name, q in zip(names, p)},
    }
    if true_label is not None:
        if isinstance(true_label, (int, np.integer)) and not isinstance(true_label, bool):
            if not 0 <= true_label < len(names):
                raise ClassificationInputError(
                    f"true_label {true_label} is not a class id: {len(names)} labels (ids 0..{len(names) - 1})."
                )
            true_label = names[int(true_label)]
        elif str(true_label) not in names:
            raise ClassificationInputError(f"true_label {true_label!r} is not one of the labels {names}.")
        row["true_label"] = str(true_label)
    return row


def write_predictions_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line to `path` atomically; returns the number of rows written."""
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ClassificationInputError(f"prediction row {i} cannot be written as JSON: {e}") from e
    write_atomic(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)
