"""A classifier scored on labelled texts: the texts as the model reads them, its probabilities a batch at a
time, and accuracy, precision, recall and F1 (llmctl.evaluation.classification) behind them.

The texts come from the val (or train) split of the dataset dir the model was trained on, another
classification dataset dir, or a labelled CSV/JSONL file (tokenized here exactly as `prepare` did: the
model's tokenizer, truncated to its max_len). Works on any classifier `load_for_inference` returns
(torch model dirs, quantized or not, and ONNX Runtime export dirs). `eval`, `eval --compare`,
`compress` and `export`'s parity check score through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import LlmctlError

# Texts per forward pass when scoring.
BATCH = 256


@dataclass
class LabelledInputs:
    """Encoded texts (ids (N, max_len), lengths (N,)), their class ids (None when unlabelled), the texts
    themselves when read from a file, and a description of where they came from."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray | None
    texts: list[str] | None
    source: str


def model_labels(loaded: Any) -> list[str]:
    labels = loaded.config.get("labels")
    if not labels:
        raise LlmctlError(f"{loaded.path}/config.json records no labels; retrain it with this llmctl.")
    return [str(x) for x in labels]


def _encoding(loaded: Any) -> tuple[int, int]:
    config = loaded.config
    if config.get("max_len") is None or config.get("pad_id") is None:
        raise LlmctlError(f"{loaded.path}/config.json records no max_len/pad_id; retrain it with this llmctl.")
    return int(config["max_len"]), int(config["pad_id"])


def inputs_from_dataset(loaded: Any, dataset_dir: Path, split: str) -> LabelledInputs:
    """A split of a classification dataset dir, refusing one whose labels or tokenizer differ from the model's."""
    from llmctl.artifacts import DatasetDir
    from llmctl.tasks.classification.data import ClassificationData
    from llmctl.evaluation.perplexity import check_same_tokenizer

    data = ClassificationData(dataset_dir)
    if data.labels != model_labels(loaded):
        raise LlmctlError(
            f"{dataset_dir}: its labels {data.labels} differ from the model's {model_labels(loaded)}; "
            "score it on a dataset prepared with the same label set."
        )
    check_same_tokenizer(DatasetDir(data.path), Path(loaded.path) / "tokenizer.json")
    ids, lengths, labels = data.split(split)
    return LabelledInputs(np.asarray(ids), np.asarray(lengths), np.asarray(labels), None, f"{dataset_dir} ({split})")


def inputs_from_file(loaded: Any, path: Path, *, require_labels: bool) -> LabelledInputs:
    """A CSV/JSONL file of texts (and labels), tokenized as the model was trained."""
    from llmctl.data.labelled import encode_for_classification, read_labelled_file

    if not Path(path).is_file():
        raise LlmctlError(f"{path}: no such file.")
    rows = read_labelled_file(path, require_labels=require_labels)
    if not rows:
        raise LlmctlError(f"{path}: no rows to score.")
    labels = model_labels(loaded)
    index = {name: i for i, name in enumerate(labels)}
    class_ids = None
    if all(r.label is not None for r in rows):
        unknown = next((r for r in rows if r.label not in index), None)
        if unknown is not None:
            raise LlmctlError(
                f"{path}, line {unknown.line}: label {unknown.label!r} is not one the model knows ({', '.join(labels)})."
            )
        class_ids = np.array([index[r.label] for r in rows], dtype=np.int64)
    elif require_labels:
        missing = next(r for r in rows if r.label is None)
        raise LlmctlError(f"{path}, line {missing.line}: no label.")
    max_len, pad_id = _encoding(loaded)
    texts = [r.text for r in rows]
    ids, lengths = encode_for_classification(loaded.tokenizer, texts, max_len, pad_id)
    return LabelledInputs(ids, lengths, class_ids, texts, str(path))


def predict_probabilities(model: Any, ids: np.ndarray, lengths: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Class probabilities (N, num_classes), a batch at a time, each batch cut to its longest text."""
    import torch

    from llmctl.models.classifiers import class_probabilities

    out = []
    with torch.inference_mode():
        for i in range(0, len(lengths), batch):
            n = torch.as_tensor(np.asarray(lengths[i : i + batch], dtype=np.int64))
            width = max(int(n.max()), 1)
            x = torch.as_tensor(np.asarray(ids[i : i + batch, :width], dtype=np.int64))
            out.append(class_probabilities(model(x, n)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def evaluate_classifier(loaded: Any, inputs: LabelledInputs) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics (when the inputs are labelled) and the probabilities behind them."""
    from llmctl.evaluation.classification import classification_metrics

    probs = predict_probabilities(loaded.model, inputs.ids, inputs.lengths)
    report: dict[str, Any] = {"source": inputs.source, "examples": int(len(inputs.lengths))}
    if inputs.labels is not None:
        report.update(classification_metrics(inputs.labels, probs.argmax(axis=1), model_labels(loaded)))
    return report, probs
