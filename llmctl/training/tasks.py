"""What the trainer trains on: language modelling over token shards, or classification of labelled texts.

The loop in trainer.py is the same for both; a task supplies the batches of a step, the loss of one
micro-batch, the evaluation row, and what "tokens" means in the logs. Each evaluation row names its
figures as the recipe's `train.monitor` and `tune.objective` refer to them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError

MAXIMIZED = {"val_accuracy", "val_f1"}


def monitor_is_better(monitor: str, value: float, best: float | None, min_delta: float) -> bool:
    """Whether `value` of `monitor` improves on `best` by more than `min_delta` (loss down, scores up)."""
    if best is None:
        return True
    return value > best + min_delta if monitor in MAXIMIZED else value < best - min_delta


def build_task(recipe: Recipe) -> "LanguageModelTask | ClassificationTask":
    if recipe.data.task == "classification":
        return ClassificationTask(recipe)
    return LanguageModelTask(recipe)


def _model_config(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
    config = recipe.model.model_dump()
    if config["vocab_size"] is None:
        config["vocab_size"] = vocab_size
    elif config["vocab_size"] < vocab_size:
        raise LlmctlError(
            f"model.vocab_size ({config['vocab_size']}) is smaller than the dataset tokenizer's "
            f"vocabulary ({vocab_size}); set it to null to follow the tokenizer."
        )
    return config


class LanguageModelTask:
    """Next-token prediction over random windows of the train shard; val loss and perplexity."""

    kind = "lm"

    def __init__(self, recipe: Recipe):
        from llmctl.data.shards import TokenShards

        self.recipe = recipe
        self.shards = TokenShards(recipe.data_dir())
        self.train_tokens, self.val_tokens = self.shards.split("train"), self.shards.split("val")
        T = recipe.model.context_length
        if len(self.train_tokens) < T + 1:
            raise LlmctlError(
                f"{self.shards.path / 'train.bin'}: {len(self.train_tokens)} tokens, fewer than model.context_length + 1 "
                f"({T + 1}); add data or lower model.context_length."
            )
        self.vocab_size = self.shards.vocab_size
        self.tokenizer_path = self.shards.tokenizer_path
        self.fingerprint = self.shards.meta.get("fingerprint")

    def model_config(self) -> dict[str, Any]:
        return _model_config(self.recipe, self.vocab_size)

    def train_examples(self) -> int:
        """Windows of context_length in the train split: what one epoch means here."""
        return max(1, len(self.train_tokens) // self.recipe.model.context_length)

    def batches(self, batch_size: int, seed: int) -> Any:
        from llmctl.training.batches import WindowBatches

        return WindowBatches(self.train_tokens, self.recipe.model.context_length, batch_size, seed)

    def tokens_in(self, batch: Any) -> int:
        return int(batch[0].numel())

    def loss(self, model: Any, batch: Any, accelerator: Any) -> Any:
        import torch.nn.functional as F

        x, y = batch
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def info(self) -> dict[str, Any]:
        return {"train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens)}

    def make_evaluator(self, micro: int, rank: int, world: int) -> Any:
        from llmctl.training.batches import WindowBatches, eval_starts

        T = self.recipe.model.context_length
        val_batches = WindowBatches(self.val_tokens, T, 1, self.recipe.run.seed)
        starts = eval_starts(len(self.val_tokens), T, self.recipe.train.eval_batches * micro * world)[rank::world]

        def evaluate(model: Any, accelerator: Any) -> dict[str, float]:
            """Mean val loss (nats/token) over the same fixed windows every time, summed over processes."""
            import torch
            import torch.nn.functional as F

            device = accelerator.device
            total = torch.zeros(2, device=device)  # (sum of losses, tokens)
            with torch.no_grad():
                for i in range(0, len(starts), micro):
                    x, y = val_batches.rows(starts[i : i + micro])
                    x, y = x.to(device), y.to(device)
                    with accelerator.autocast():
                        logits = model(x)  # (B, T, V)
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
                    total += torch.stack([loss, torch.tensor(float(y.numel()), device=device)])
            total = accelerator.reduce(total, reduction="sum")
            val = float(total[0] / total[1]) if total[1] > 0 else float("nan")
            return {"val_loss": round(val, 6), "val_ppl": round(math.exp(min(val, 50.0)), 4)}

        return evaluate


class ClassificationTask:
    """Labelled texts: (class-weighted) cross-entropy; val loss, accuracy, macro precision/recall/F1."""

    kind = "classification"

    def __init__(self, recipe: Recipe):
        from llmctl.data.classification import ClassificationData
        from llmctl.training.examples import class_weight_tensor

        self.recipe = recipe
        self.data = ClassificationData(recipe.data_dir())
        self.train = self.data.split("train")
        self.val = self.data.split("val")
        if len(self.train[2]) == 0:
            raise LlmctlError(f"{recipe.data_dir()}: the train split holds no examples; add data.")
        self.vocab_size = self.data.vocab_size
        self.tokenizer_path = self.data.tokenizer_path
        self.fingerprint = self.data.meta.get("fingerprint")
        self.labels = list(self.data.labels)
        self.class_weights = class_weight_tensor(recipe.train.class_weights, np.asarray(self.train[2]), self.data.num_classes)

    def model_config(self) -> dict[str, Any]:
        config = _model_config(self.recipe, self.vocab_size)
        config.update(num_classes=self.data.num_classes, pad_id=self.data.pad_id, max_len=self.data.max_len,
                      labels=self.labels)
        return config

    def train_examples(self) -> int:
        return len(self.train[2])

    def batches(self, batch_size: int, seed: int) -> Any:
        from llmctl.training.examples import ExampleBatches

        return ExampleBatches(*self.train, batch_size, seed)

    def tokens_in(self, batch: Any) -> int:
        return int(batch[1].sum())

    def loss(self, model: Any, batch: Any, accelerator: Any) -> Any:
        from llmctl.models.classifiers import classification_loss

        ids, lengths, labels = batch
        logits = model(ids, lengths)  # (B, n_out)
        weights = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return classification_loss(logits.float(), labels, weights)

    def info(self) -> dict[str, Any]:
        return {"train_examples": len(self.train[2]), "val_examples": len(self.val[2]), "classes": self.labels,
                "train_tokens": int(np.asarray(self.train[1]).sum()), "val_tokens": int(np.asarray(self.val[1]).sum())}

    def make_evaluator(self, micro: int, rank: int, world: int) -> Any:
        from llmctl.training.examples import ExampleBatches

        ids, lengths, labels = self.val
        mine = np.arange(len(labels))[rank::world]
        val = ExampleBatches(ids, lengths, labels, max(1, len(labels)), self.recipe.run.seed)
        num_classes = self.data.num_classes
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


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * examples / batch_size))
