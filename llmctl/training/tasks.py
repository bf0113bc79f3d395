"""What the trainer trains on: language modelling over token shards, classification of labelled texts,
or instruction tuning on conversations with the loss on response tokens only.

The loop in trainer.py is the same for all; a task supplies the batches of a step, the loss of one
micro-batch, the evaluation row, and what "tokens" means in the logs. Each evaluation row names its
figures as the recipe's `train.monitor` and `tune.objective` refer to them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError
from llmctl.training.examples import EpochOrder

MAXIMIZED = {"val_accuracy", "val_f1"}


def monitor_is_better(monitor: str, value: float, best: float | None, min_delta: float) -> bool:
    """Whether `value` of `monitor` improves on `best` by more than `min_delta` (loss down, scores up)."""
    if best is None:
        return True
    return value > best + min_delta if monitor in MAXIMIZED else value < best - min_delta


def build_task(recipe: Recipe) -> "LanguageModelTask | ClassificationTask | InstructionTask":
    if recipe.data.task == "classification":
        return ClassificationTask(recipe)
    if recipe.data.task == "instruct":
        return InstructionTask(recipe)
    return LanguageModelTask(recipe)


def model_config_of(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
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
        return model_config_of(self.recipe, self.vocab_size)

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
        from llmctl.tasks.classification.data import ClassificationData
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
        config = model_config_of(self.recipe, self.vocab_size)
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


class InstructionBatches(EpochOrder):
    """Conversations, one per row, right-padded to the longest in the micro-batch and cut at
    context_length + 1 tokens, addressed by optimizer step as `ExampleBatches` addresses its examples:
    step s takes slots s*B .. (s+1)*B-1, slot i being conversation perm_e[i mod N] of epoch e = i // N.

    Padding rather than packing: every response sees its whole prompt and nothing of another
    conversation, and an epoch is each conversation once. Cutting each micro-batch to its longest row
    keeps the padding small when lengths are alike.
    """

    def __init__(self, split: Any, context_length: int, batch_size: int, seed: int, pad_id: int):
        self.tokens, self.mask = split.tokens, split.mask
        self.starts, self.ends = np.asarray(split.starts, dtype=np.int64), split.ends
        self.context_length = context_length
        self.pad_id = pad_id
        super().__init__(len(self.starts), batch_size, seed)

    def rows(self, index: np.ndarray) -> tuple[Any, Any, Any, Any]:
        """Inputs (B, W), next-token targets (B, W), target mask (B, W) float (1 = a response token) and
        real input tokens per row (B,), W being the longest row's length (at most context_length)."""
        import torch

        lengths = np.minimum(self.ends[index] - self.starts[index], self.context_length + 1)  # (B,) with the last target
        width = max(int(lengths.max()), 2) if len(lengths) else 2
        ids = np.full((len(index), width), self.pad_id, dtype=np.int64)  # (B, W+1)
        keep = np.zeros((len(index), width), dtype=np.float32)  # (B, W+1)
        for row, (start, n) in enumerate(zip(self.starts[index], lengths)):
            ids[row, :n] = self.tokens[start : start + n]
            keep[row, :n] = self.mask[start : start + n]
        ids_t, keep_t = torch.from_numpy(ids), torch.from_numpy(keep)
        return ids_t[:, :-1], ids_t[:, 1:], keep_t[:, 1:], torch.from_numpy(np.maximum(lengths - 1, 0))

    def micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[tuple]:
        """This process's micro-batches of `step`, each ending with the divisor that makes the mean of
        their losses the mean over every response token of the step here (whatever the micro-batch size)."""
        import torch

        per_rank = self.batch_size // world
        mine = self.indices(step)[rank * per_rank : (rank + 1) * per_rank]
        parts = [self.rows(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
        responses = float(sum(float(p[2].sum()) for p in parts))
        per_micro = torch.tensor(responses / len(parts) if responses else 1.0)
        return [(*p, per_micro) for p in parts]


class InstructionTask:
    """Conversations with the next-token loss on response tokens only; val loss over response tokens."""

    kind = "instruct"

    def __init__(self, recipe: Recipe):
        from llmctl.tasks.instruct.data import InstructionData

        self.recipe = recipe
        self.data = InstructionData(recipe.data_dir())
        self.train, self.val = self.data.split("train"), self.data.split("val")
        if len(self.train) == 0:
            raise LlmctlError(f"{recipe.data_dir()}: the train split holds no conversations; add data.")
        self.vocab_size = self.data.vocab_size
        self.tokenizer_path = self.data.tokenizer_path
        self.fingerprint = self.data.meta.get("fingerprint")
        self.chat_template = self.data.chat_template
        self._check_base_tokenizer()

    def _check_base_tokenizer(self) -> None:
        """A fine-tune must read its base model's token ids: refuse a dataset tokenized otherwise."""
        from pathlib import Path

        from llmctl.data.tokenizer import load_tokenizer

        base = Path(self.recipe.model.init_from) / "tokenizer.json" if self.recipe.model.init_from else None
        if base is None or not base.is_file():
            return
        if load_tokenizer(base).get_vocab() != load_tokenizer(self.tokenizer_path).get_vocab():
            raise LlmctlError(
                f"{self.tokenizer_path}: the dataset's tokenizer is not the one of model.init_from ({base}); set "
                f"data.tokenizer: {base} and prepare again (llmctl prepare --force)."
            )

    def model_config(self) -> dict[str, Any]:
        return model_config_of(self.recipe, self.vocab_size)

    def train_examples(self) -> int:
        return len(self.train)

    def batches(self, batch_size: int, seed: int) -> InstructionBatches:
        return InstructionBatches(self.train, self.recipe.model.context_length, batch_size, seed, self.data.eot_id)

    def tokens_in(self, batch: Any) -> int:
        return int(batch[3].sum())

    def loss(self, model: Any, batch: Any, accelerator: Any) -> Any:
        import torch.nn.functional as F

        x, y, keep, _, per_micro = batch
        logits = model(x)  # (B, W, V)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")  # (B*W,)
        return (nll * keep.reshape(-1)).sum() / per_micro

    def info(self) -> dict[str, Any]:
        T = self.recipe.model.context_length
        cut = int(((self.train.ends - self.train.starts.astype(np.int64)) > T + 1).sum())
        return {"train_examples": len(self.train), "val_examples": len(self.val), "train_tokens": len(self.train.tokens),
                "val_tokens": len(self.val.tokens), "train_response_tokens": int(self.data.meta["splits"]["train"]["response_tokens"]),
                "truncated_examples": cut}

    def make_evaluator(self, micro: int, rank: int, world: int) -> Any:
        val = InstructionBatches(self.val, self.recipe.model.context_length, 1, self.recipe.run.seed, self.data.eot_id)
        count = min(len(val), self.recipe.train.eval_batches * micro * world)
        mine = np.arange(count)[rank::world]

        def evaluate(model: Any, accelerator: Any) -> dict[str, float]:
            """Mean loss (nats per response token) over the same val conversations every time."""
            import torch
            import torch.nn.functional as F

            device = accelerator.device
            total = torch.zeros(2, device=device)  # (sum of response-token losses, response tokens)
            with torch.no_grad():
                for i in range(0, len(mine), micro):
                    x, y, keep, _ = (t.to(device) for t in val.rows(mine[i : i + micro]))
                    with accelerator.autocast():
                        logits = model(x)  # (B, W, V)
                    nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
                    total += torch.stack([(nll * keep.reshape(-1)).sum(), keep.sum()])
            total = accelerator.reduce(total, reduction="sum")
            value = float(total[0] / total[1]) if total[1] > 0 else float("nan")
            return {"val_loss": round(value, 6), "val_ppl": round(math.exp(min(value, 50.0)), 4)}

        return evaluate


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * examples / batch_size))
