"""The serving engine's running batch: one left-padded KV cache shared by every running request.

Row b's real tokens fill the rightmost `lengths[b]` columns of the cache; the columns to their left
are padding (zeros, masked out of attention). A decode step feeds every row its next token at its
own position (its length), so each row attends to exactly the keys it would see alone. A request
joins after a prefill of its prompt on its own (B = 1, the very call `generate` makes), its cache
left-padded to the batch's width; rows that finish leave, and the columns that are then padding in
every row are cut off.

Works with any model called like the `gpt` family (`model(ids, past_key_values=, position_ids=,
attention_mask=, use_cache=)` -> logits, per-layer (k, v)): the torch model and OnnxCausalLM alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def prefill(model: Any, prompt_ids: list[int], device: torch.device) -> tuple[torch.Tensor, KVCache]:
    """Run one prompt alone, unpadded and unmasked as `generate` does -> last-position logits (1, V) and its cache."""
    logits, cache = model(torch.tensor([prompt_ids], device=device), use_cache=True)  # (1, T, V)
    return logits[:, -1, :], cache


def cache_width(cache: KVCache) -> int:
    """Columns (key positions) in a cache whose tensors are (B, n_kv_head, S, head_size)."""
    return cache[0][0].shape[2]


class RunningBatch:
    """The rows being decoded together: their shared cache, their lengths and the token each feeds next."""

    def __init__(self, model: Any, device: torch.device):
        self.model = model
        self.device = device
        self.cache: KVCache | None = None  # per layer (k, v), each (B, n_kv_head, S, head_size)
        self.lengths: list[int] = []  # real tokens of each row: the rightmost lengths[b] columns
        self.next_ids: list[int] = []  # the token each row feeds at the next step

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """S, the cache's columns: the longest row's length."""
        return 0 if self.cache is None else cache_width(self.cache)

    def join(self, rows: list[tuple[KVCache, int]]) -> None:
        """Append rows, each (its own B = 1 cache, the token it feeds next), left-padding all to one width."""
        if not rows:
            return
        parts = ([self.cache] if self.cache is not None else []) + [cache for cache, _ in rows]
        width = max(cache_width(c) for c in parts)
        self.cache = [
            (
                torch.cat([_left_pad(c[layer][0], width) for c in parts]),  # (B', nkv, S', hs)
                torch.cat([_left_pad(c[layer][1], width) for c in parts]),
            )
            for layer in range(len(parts[0]))
        ]
        self.lengths += [cache_width(cache) for cache, _ in rows]
        self.next_ids += [next_id for _, next_id in rows]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices, in order) and cut the leading columns that are padding in all of them."""
        if len(rows) == len(self):
            return
        if not rows:
            self.cache, self.lengths, self.next_ids = None, [], []
            return
        start = self.width - max(self.lengths[r] for r in rows)
        index = torch.tensor(rows, device=self.device)
        self.cache = [
            (k[:, :, start:].index_select(0, index), v[:, :, start:].index_select(0, index))  # (B', nkv, S', hs)
            for k, v in self.cache  # type: ignore[union-attr]
        ]
        self.lengths = [self.lengths[r] for r in rows]
        self.next_ids = [self.next_ids[r] for r in rows]

    def step(self) -> torch.Tensor:
        """Feed every row its next token -> logits (B, V) for the token after it; the cache grows one column.

        The mask is left out when no row is padded, so a batch of one runs exactly `generate`'s call.
        """
        B, S = len(self), self.width
        ids = torch.tensor(self.next_ids, device=self.device).view(B, 1)  # (B, 1)
        lengths = torch.tensor(self.lengths, device=self.device)  # (B,)
        mask = None
        if min(self.lengths) < S:
            mask = (torch.arange(S + 1, device=self.device)[None, :] >= (S - lengths)[:, None]).long()  # (B, S+1)
        logits, cache = self.model(
            ids, past_key_values=self.cache, position_ids=lengths[:, None], attention_mask=mask, use_cache=True
        )  # (B, 1, V)
        self.cache = cache
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1, :]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """A (B, nkv, S, hs) cache tensor with zero columns prepended up to `width`."""
    pad = width - t.shape[2]
    return F.pad(t, (0, 0, pad, 0)) if pad else t
