"""Batches of labelled examples for classification, addressed by optimizer step like `WindowBatches`.

Step `s` of a run takes global example slots s*B .. (s+1)*B-1; slot i is example perm_e[i mod N] of
epoch e = i // N, where perm_e is a permutation seeded by (seed, e). So every epoch sees each example
once, a checkpoint's data position is just its step, and each process takes its own slice of the
same global batch.
"""

from __future__ import annotations

import numpy as np
import torch

ClassBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids (B, T), lengths (B,), labels (B,)


class EpochOrder:
    """Which examples (of `len(self)`) the global batch of each step takes: see the module docstring."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self._count = count
        self.batch_size = batch_size
        self.seed = seed
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._count

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._perm_cache[1]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch of step `step`."""
        n = len(self)
        slots = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self._permutation(int(s // n))[s % n] for s in slots], dtype=np.int64)


class ExampleBatches(EpochOrder):
    def __init__(self, ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        super().__init__(len(labels), batch_size, seed)
        self.ids, self.lengths, self.labels = ids, lengths, labels

    def rows(self, index: np.ndarray) -> ClassBatch:
        """Token ids cut to the longest example in the batch, lengths and labels, as int64 tensors."""
        lengths = np.asarray(self.lengths[index], dtype=np.int64)
        width = int(lengths.max()) if len(lengths) else 1
        ids = np.asarray(self.ids[index, :width], dtype=np.int64)
        return torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(np.asarray(self.labels[index], dtype=np.int64))

    def micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[ClassBatch]:
        per_rank = self.batch_size // world
        mine = self.indices(step)[rank * per_rank : (rank + 1) * per_rank]
        return [self.rows(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


def class_weight_tensor(setting: str | list[float], labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """train.class_weights as one weight per class: None for "none"; "balanced" is n / (classes x count)."""
    if setting == "none":
        return None
    if setting == "balanced":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weights = len(labels) / (num_classes * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)
    if len(setting) != num_classes:
        from llmctl.errors import LlmctlError

        raise LlmctlError(
            f"train.class_weights: {len(setting)} weights for {num_classes} classes; give one per class in label order."
        )
    return torch.tensor(setting, dtype=torch.float32)
