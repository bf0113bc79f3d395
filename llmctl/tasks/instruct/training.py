"""Instruction tuning: conversations, one per row, with the next-token loss on response tokens only; val
loss (nats per response token) over the same val conversations at every evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError
from llmctl.training.examples import EpochOrder
from llmctl.training.task_data import Evaluator, TaskData, language_model_shape

planned_shape = language_model_shape  # the shape the memory planner plans: the decoder itself


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


class TrainingData(TaskData):
    """An instruct dataset dir: conversations with their response mask, and the chat template they were rendered with."""

    def __init__(self, recipe: Recipe):
        from llmctl.tasks.instruct.data import open_dataset

        super().__init__(recipe, open_dataset(recipe.data_dir()))
        self.train, self.val = self.dataset.split("train"), self.dataset.split("val")
        if len(self.train) == 0:
            raise LlmctlError(f"{recipe.data_dir()}: the train split holds no conversations; add data.")
        self.chat_template = self.dataset.chat_template
        self._check_base_tokenizer()

    def _check_base_tokenizer(self) -> None:
        """A fine-tune must read its base model's token ids: refuse a dataset tokenized otherwise."""
        from llmctl.data.tokenizer import load_tokenizer

        base = Path(self.recipe.model.init_from) / "tokenizer.json" if self.recipe.model.init_from else None
        if base is None or not base.is_file():
            return
        if load_tokenizer(base).get_vocab() != load_tokenizer(self.tokenizer_path).get_vocab():
            raise LlmctlError(
                f"{self.tokenizer_path}: the dataset's tokenizer is not the one of model.init_from ({base}); set "
                f"data.tokenizer: {base} and prepare again (llmctl prepare --force)."
            )

    def model_shape(self) -> Any:
        return language_model_shape(self.recipe, self.vocab_size)

    def train_examples(self) -> int:
        return len(self.train)

    def batches(self, batch_size: int, seed: int) -> InstructionBatches:
        return InstructionBatches(self.train, self.recipe.model.context_length, batch_size, seed, self.dataset.eot_id)

    def tokens_in(self, batch: Any) -> int:
        return int(batch[3].sum())

    def loss(self, model: Any, batch: Any, accelerator: Any = None) -> Any:
        from llmctl.training.losses import next_token_nll

        x, y, keep, _, per_micro = batch
        nll = next_token_nll(model(x), y, reduction="none")  # logits (B, W, V) -> (B*W,)
        return (nll * keep.reshape(-1)).sum() / per_micro

    def _truncated(self) -> int:
        """Train conversations longer than context_length + 1 tokens (each is cut there)."""
        T = self.recipe.model.context_length
        return int(((self.train.ends - self.train.starts.astype(np.int64)) > T + 1).sum())

    def info(self) -> dict[str, Any]:
        return {"train_examples": len(self.train), "val_examples": len(self.val), "train_tokens": len(self.train.tokens),
                "val_tokens": len(self.val.tokens), "train_response_tokens": int(self.dataset.meta["splits"]["train"]["response_tokens"]),
                "truncated_examples": self._truncated(), "context_length": self.recipe.model.context_length}

    def describe_step(self, batch_size: int) -> str:
        info = self.info()
        return (f"{batch_size} conversations/step ({info['train_examples']:,} train, {info['val_examples']:,} "
                f"val; the loss on their {info['train_response_tokens']:,} response tokens)")

    def notes(self) -> list[str]:
        cut = self._truncated()
        if not cut:
            return []
        T = self.recipe.model.context_length
        return [f"{cut:,} train conversations are longer than model.context_length + 1 ({T + 1} tokens): each is cut there"]

    def model_config_extra(self) -> dict[str, Any]:
        return {"chat_template": self.chat_template}  # the template the data was rendered with: serve prompts with it

    def make_evaluator(self, micro: int, rank: int, world: int) -> Evaluator:
        val = InstructionBatches(self.val, self.recipe.model.context_length, 1, self.recipe.run.seed, self.dataset.eot_id)
        count = min(len(val), self.recipe.train.eval_batches * micro * world)
        mine = np.arange(count)[rank::world]

        def evaluate(model: Any, accelerator: Any) -> dict[str, float]:
            """Mean loss (nats per response token) over the same val conversations every time."""
            import torch

            from llmctl.training.losses import next_token_nll

            device = accelerator.device
            total = torch.zeros(2, device=device)  # (sum of response-token losses, response tokens)
            with torch.no_grad():
                for i in range(0, len(mine), micro):
                    x, y, keep, _ = (t.to(device) for t in val.rows(mine[i : i + micro]))
                    with accelerator.autocast():
                        logits = model(x)  # (B, W, V)
                    nll = next_token_nll(logits, y, reduction="none")
                    total += torch.stack([(nll * keep.reshape(-1)).sum(), keep.sum()])
            total = accelerator.reduce(total, reduction="sum")
            value = float(total[0] / total[1]) if total[1] > 0 else float("nan")
            return {"val_loss": round(value, 6), "val_ppl": round(math.exp(min(value, 50.0)), 4)}

        return evaluate
