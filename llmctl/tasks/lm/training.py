"""Training a language model: next-token prediction over random windows of the train shard; val loss
and perplexity over the same fixed windows of the val shard at every evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError
from llmctl.training.task_data import Evaluator, TaskData, language_model_shape

planned_shape = language_model_shape  # the shape the memory planner plans: the decoder itself


class TrainingData(TaskData):
    """The token shards of an lm dataset dir, read in windows of model.context_length."""

    counts_examples = False

    def __init__(self, recipe: Recipe):
        from llmctl.data.shards import TokenShards

        super().__init__(recipe, TokenShards(recipe.data_dir()))
        self.train_tokens, self.val_tokens = self.dataset.split("train"), self.dataset.split("val")
        T = recipe.model.context_length
        if len(self.train_tokens) < T + 1:
            raise LlmctlError(
                f"{Path(self.dataset.path) / 'train.bin'}: {len(self.train_tokens)} tokens, fewer than model.context_length "
                f"+ 1 ({T + 1}); add data or lower model.context_length."
            )

    def model_shape(self) -> Any:
        return language_model_shape(self.recipe, self.vocab_size)

    def train_examples(self) -> int:
        """Windows of context_length in the train split: what one epoch means here."""
        return max(1, len(self.train_tokens) // self.recipe.model.context_length)

    def batches(self, batch_size: int, seed: int) -> Any:
        from llmctl.training.batches import WindowBatches

        return WindowBatches(self.train_tokens, self.recipe.model.context_length, batch_size, seed)

    def tokens_in(self, batch: Any) -> int:
        return int(batch[0].numel())

    def step_tokens(self, batch_size: int) -> int | None:
        return batch_size * self.recipe.model.context_length  # every window is full: the same on every process

    def loss(self, model: Any, batch: Any, accelerator: Any = None) -> Any:
        from llmctl.training.losses import next_token_nll

        x, y = batch
        return next_token_nll(model(x), y)  # logits (B, T, V)

    def probe_loss(self, batches: Any, accelerator: Any) -> Callable[[Any, int], Any] | None:
        from llmctl.training.losses import next_token_nll

        starts = batches.starts(0)

        def step_loss(model: Any, size: int) -> Any:
            x, y = batches.rows(starts[:size])
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            with accelerator.autocast():
                logits = model(x)  # (B, T, V)
            return next_token_nll(logits, y)

        return step_loss

    def info(self) -> dict[str, Any]:
        return {"train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens),
                "context_length": self.recipe.model.context_length}

    def describe_step(self, batch_size: int) -> str:
        return f"{batch_size * self.recipe.model.context_length:,} tokens/step"

    def model_config_extra(self) -> dict[str, Any]:
        """The chat template of the model.init_from dir it continues (an llmctl model dir's or a Hugging Face
        dir's), so serve keeps prompting it the same way."""
        init = self.recipe.model.init_from
        if not init or not Path(init).is_dir():
            return {}
        from llmctl.data.chat_template import chat_template_beside

        found = chat_template_beside(Path(init))
        return {"chat_template": found[0]} if found and isinstance(found[0], str) else {}

    def make_evaluator(self, micro: int, rank: int, world: int) -> Evaluator:
        from llmctl.training.batches import WindowBatches, eval_starts

        T = self.recipe.model.context_length
        val_batches = WindowBatches(self.val_tokens, T, 1, self.recipe.run.seed)
        starts = eval_starts(len(self.val_tokens), T, self.recipe.train.eval_batches * micro * world)[rank::world]

        def evaluate(model: Any, accelerator: Any) -> dict[str, float]:
            """Mean val loss (nats/token) over the same fixed windows every time, summed over processes."""
            import torch

            from llmctl.training.losses import next_token_nll

            device = accelerator.device
            total = torch.zeros(2, device=device)  # (sum of losses, tokens)
            with torch.no_grad():
                for i in range(0, len(starts), micro):
                    x, y = val_batches.rows(starts[i : i + micro])
                    x, y = x.to(device), y.to(device)
                    with accelerator.autocast():
                        logits = model(x)  # (B, T, V)
                    loss = next_token_nll(logits, y, reduction="sum")
                    total += torch.stack([loss, torch.tensor(float(y.numel()), device=device)])
            total = accelerator.reduce(total, reduction="sum")
            val = float(total[0] / total[1]) if total[1] > 0 else float("nan")
            return {"val_loss": round(val, 6), "val_ppl": round(math.exp(min(val, 50.0)), 4)}

        return evaluate
