"""Random windows of a flat token file, addressed by optimizer step.

The global batch of step `s` depends only on (seed, s), so the data position of a
checkpoint is just its step, and each process takes its own slice of the same
global batch (rank r reads rows r*per_rank .. (r+1)*per_rank).
"""

from __future__ import annotations

import numpy as np
import torch


class WindowBatches:
    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.max_start = len(tokens) - context_length - 1

    def starts(self, step: int) -> np.ndarray:
        """Start offsets (tokens) of the `batch_size` windows of global step `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.max_start + 1, size=self.batch_size)

    def rows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64."""
        T = self.context_length
        block = np.stack([np.asarray(self.tokens[s : s + T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
        block_t = torch.from_numpy(block)
        return block_t[:, :-1], block_t[:, 1:]

    def micro_batches(
        self, step: int, rank: int, world: int, micro_batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = self.batch_size // world
        mine = self.starts(step)[rank * per_rank : (rank + 1) * per_rank]
        return [self.rows(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


def eval_starts(n_tokens: int, context_length: int, count: int) -> np.ndarray:
    """Evenly spaced, non-overlapping window starts over a split (the same at every evaluation)."""
    usable = n_tokens - context_length - 1
    if usable < 0:
        return np.zeros(0, dtype=np.int64)
    windows = usable // context_length + 1
    if windows <= count:
        return np.arange(windows, dtype=np.int64) * context_length
    return np.linspace(0, usable, count).astype(np.int64)
