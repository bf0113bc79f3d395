"""Training a classifier on labelled texts: (class-weighted) cross-entropy over epochs of the train split;
val loss, accuracy and macro precision/recall/F1 over the whole val split at every evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError
from llmctl.training.task_data import Evaluator, TaskData, model_vocab_size


def planned_shape(recipe: Recipe, vocab_size: int) -> None:
    """The memory planner plans the gpt decoder's step only: a classifier's micro-batch is given, not planned."""
    return None


class TrainingData(TaskData):
    """A classification dataset dir: padded token ids, lengths and labels per split, and the label set."""

    def __init__(self, recipe: Recipe):
        from llmctl.tasks.classification.data import open_dataset
        from llmctl.training.examples import class_weight_tensor

        super().__init__(recipe, open_dataset(recipe.data_dir()))
        self.train = self.dataset.split("train")
        self.val = self.dataset.split("val")
        if len(self.train[2]) == 0:
            raise LlmctlError(f"{recipe.data_dir()}: the train split holds no examples; add data.")
        self.labels = list(self.dataset.labels)
        self.class_weights = class_weight_tensor(recipe.train.class_weights, np.asarray(self.train[2]),
                                                 self.dataset.num_classes)

    def model_shape(self) -> Any:
        return self.recipe.model.classifier_shape(
            model_vocab_size(self.recipe, self.vocab_size), num_classes=self.dataset.num_classes,
            pad_id=self.dataset.pad_id, max_len=self.dataset.max_len, labels=self.labels,
        )

    def train_examples(self) -> int:
        return len(self.train[2])

    def batches(self, batch_size: int, seed: int) -> Any:
        from llmctl.training.examples import ExampleBatches

        return ExampleBatches(*self.train, batch_size, seed)

    def tokens_in(self, batch: Any) -> int:
        return int(batch[1].sum())

    def loss(self, model: Any, batch: Any, accelerator: Any = None) -> Any:
        from llmctl.models.classifiers import classification_loss

        ids, lengths, labels = batch
        logits = model(ids, lengths)  # (B, n_out)
        weights = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return classification_loss(logits.float(), labels, weights)

    def info(self) -> dict[str, Any]:
        return {"train_examples": len(self.train[2]), "val_examples": len(self.val[2]), "classes": self.labels,
                "train_tokens": int(np.asarray(self.train[1]).sum()), "val_tokens": int(np.asarray(self.val[1]).sum())}

    def describe_step(self, batch_size: int) -> str:
        return (f"{batch_size} examples/step ({len(self.train[2]):,} train, {len(self.val[2]):,} val; "
                f"classes {', '.join(map(str, self.labels))})")

    def make_evaluator(self, micro: int, rank: int, world: int) -> Evaluator:
        from llmctl.training.examples import ExampleBatches

        ids, lengths, labels = self.val
        mine = np.arange(len(labels))[rank::world]
        val = ExampleBatches(ids, lengths, labels, max(1, len(labels)), self.recipe.run.seed)
        num_classes = self.dataset.num_classes
        batch = max(micro, 64)

        def evaluate(model: Any, accelerator: Any) -> dict[str, float]:
            """Loss and confusion counts over the whole val split (each process its share), then the scores."""
            import torch

            from llmctl.evaluation.classification import classification_metrics, f1_key_figures
            from llmctl.models.classifiers import classification_loss, predict

            device = accelerator.device
            loss_sum = torch.zeros((), device=device)
            confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
            with torch.no_grad():
                for i in range(0, len(mine), batch):
                    x, n, y = (t.to(device) for t in val.rows(mine[i : i + batch]))
                    with accelerator.autocast():
                        logits = model(x, n)
                    loss_sum += classification_loss(logits.float(), y) * len(y)
                    pred = predict(logits)
                    confusion.index_put_((y, pred), torch.ones_like(y, dtype=torch.float64), accumulate=True)
            loss_sum = accelerator.reduce(loss_sum, reduction="sum")
            confusion = accelerator.reduce(confusion, reduction="sum").long().cpu().numpy()
            y_true = np.repeat(np.arange(num_classes), confusion.sum(axis=1))
            y_pred = np.concatenate([np.repeat(np.arange(num_classes), row) for row in confusion])
            figures = f1_key_figures(classification_metrics(y_true, y_pred, self.labels))
            row = {"val_loss": round(float(loss_sum) / max(len(y_true), 1), 6)}
            row.update({k: round(v, 6) for k, v in figures.items()})
            return row

        return evaluate
