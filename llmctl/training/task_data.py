"""What the trainer asks of a task: its prepared dataset seen as training data.

Each task's `llmctl.tasks.<task>.training.TrainingData(recipe)` is a `TaskData`: the model shape to
build, the batches of a step, the loss of one micro-batch, the evaluator of the val split (its row names
its figures as `train.monitor` and `tune.objective` refer to them) and what the logs count. The loop in
trainer.py is the same for every task and never asks which one it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError

# A task's evaluator: (model, accelerator) -> {"val_loss": ..., and the task's figures}.
Evaluator = Callable[[Any, Any], dict[str, float]]


class TaskData(ABC):
    """A task's dataset as the trainer reads it. Subclasses open the dataset and implement the abstract
    methods (a task missing one fails when its TrainingData is made, not mid-run); the others have the
    defaults most tasks want."""

    # Metrics rows and the result count examples as well as tokens (a language model's counts tokens only).
    counts_examples: ClassVar[bool] = True

    def __init__(self, recipe: Recipe, dataset: Any):
        self.recipe = recipe
        self.dataset = dataset
        self.vocab_size: int = dataset.vocab_size
        self.tokenizer_path = dataset.tokenizer_path
        self.fingerprint: str | None = dataset.fingerprint

    @abstractmethod
    def model_shape(self) -> Any:
        """The shape of the model to build (a GPTConfig, GPTClassifierConfig or RNNConfig)."""

    @abstractmethod
    def train_examples(self) -> int:
        """Examples in the train split: what one epoch means (train.epochs)."""

    @abstractmethod
    def batches(self, batch_size: int, seed: int) -> Any:
        """The train split's batches, addressed by step: `micro_batches(step, rank, world, micro)`."""

    @abstractmethod
    def tokens_in(self, batch: Any) -> int:
        """Real tokens in one micro-batch (padding not counted)."""

    @abstractmethod
    def loss(self, model: Any, batch: Any, accelerator: Any = None) -> Any:
        """The loss of one micro-batch, a scalar tensor; the mean of a step's micro-batches is the step's."""

    @abstractmethod
    def make_evaluator(self, micro: int, rank: int, world: int) -> Evaluator:
        """The val split's evaluator for this process (`rank` of `world`, `micro` rows at a time)."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What the run's start reports about the data (sizes of the splits, classes)."""

    @abstractmethod
    def describe_step(self, batch_size: int) -> str:
        """What one optimizer step trains on, for the line the run starts with: "4,096 tokens/step"."""

    def step_tokens(self, batch_size: int) -> int | None:
        """Tokens of every step when they are known in advance (full windows), else None: the real
        tokens each process read are summed."""
        return None

    def notes(self) -> list[str]:
        """Lines to say when the run starts (conversations cut at the context, ...)."""
        return []

    def model_config_extra(self) -> dict[str, Any]:
        """Entries the model dir's config.json gets beside the shape (a chat template, ...)."""
        return {}

    def probe_loss(self, batches: Any, accelerator: Any) -> Callable[[Any, int], Any] | None:
        """`micro_batch_size: auto` on a GPU: the loss of a forward over `size` rows of the first batch, to
        try sizes with; None when this task's micro-batches are not probed."""
        return None


def model_vocab_size(recipe: Recipe, vocab_size: int) -> int:
    """model.vocab_size, or the dataset tokenizer's `vocab_size` when it is null; refuses a smaller one."""
    given = recipe.model.vocab_size
    if given is None:
        return vocab_size
    if given < vocab_size:
        raise LlmctlError(
            f"model.vocab_size ({given}) is smaller than the dataset tokenizer's vocabulary ({vocab_size}); "
            "set it to null to follow the tokenizer."
        )
    return given


def language_model_shape(recipe: Recipe, vocab_size: int) -> Any:
    """The GPTConfig of a recipe whose model is a language model (lm, instruct), its vocabulary the dataset's."""
    return recipe.model.language_model_shape(model_vocab_size(recipe, vocab_size))
