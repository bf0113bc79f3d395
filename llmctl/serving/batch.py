"""The serving engine's running batch: one left-padded KV cache shared by every running request.

Row b's real tokens fill the rightmost `lengths[b]` columns of the cache; the columns to their left
are padding (masked out of attention; their values are never read). A decode step feeds every row its
next token at its own position (its length), so each row attends to exactly the keys it would see
alone. A request joins after a prefill of its prompt on its own (B = 1, the very call `generate`
makes), its cache placed at the right edge of the batch's; rows that finish leave, and the columns
that are then padding in every row are cut off.

Two cache layouts, the same results:
- a model that `accepts_kv_window` (the torch `gpt` family, plain or quantized) decodes into
  preallocated buffers (llmctl.models.kv_window): a step writes one column in place, where a growing
  cache would copy all of itself (most of a 16-row step of a small model);
- any other model called like the `gpt` family (`model(ids, past_key_values=, position_ids=,
  attention_mask=, use_cache=)` -> logits, per-layer (k, v)), e.g. OnnxCausalLM, gets a list of
  per-layer (k, v) tensors and returns them grown by one column.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmctl.models.kv_window import KVWindow

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# Spare columns of a preallocated cache beyond the context length: the window slides right one column
# a step and is moved back to column 0 (one copy) when it reaches the end.
_SPARE_COLUMNS = 64


def prefill(model: Any, prompt_ids: list[int], device: torch.device) -> tuple[torch.Tensor, KVCache]:
    """Run one prompt alone, unpadded and unmasked as `generate` does -> last-position logits (1, V) and its cache."""
    logits, cache = model(torch.tensor([prompt_ids], device=device), use_cache=True)  # (1, T, V)
    return logits[:, -1, :], cache


def cache_width(cache: KVCache) -> int:
    """Columns (key positions) in a cache whose tensors are (B, n_kv_head, S, head_size)."""
    return cache[0][0].shape[2]


class RunningBatch:
    """The rows being decoded together: their shared cache, their lengths and the token each feeds next.

    `max_rows` and `context_length` size the preallocated cache of a model that accepts one.
    """

    def __init__(self, model: Any, device: torch.device, *, max_rows: int = 16, context_length: int | None = None):
        self.model = model
        self.device = device
        self.lengths: list[int] = []  # real tokens of each row: the rightmost lengths[b] columns
        self.next_ids: list[int] = []  # the token each row feeds at the next step
        self._list: KVCache | None = None  # the growing layout
        self._window: KVWindow | None = None  # the preallocated layout
        self._windowed = bool(getattr(model, "accepts_kv_window", False)) and context_length is not None
        self._max_rows = max_rows
        self._columns = (context_length or 0) + _SPARE_COLUMNS

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """S, the cache's columns: the longest row's length."""
        if self._window is not None:
            return self._window.length if self.lengths else 0
        return 0 if self._list is None else cache_width(self._list)

    @property
    def cache(self) -> KVCache | None:
        """The rows' cache as per-layer (k, v) of (B, n_kv_head, S, head_size) (views, for the windowed layout)."""
        if self._window is None:
            return self._list
        if not self.lengths:
            return None
        w = self._window
        return [(k[: len(self), :, w.start : w.end], v[: len(self), :, w.start : w.end]) for k, v in zip(w.keys, w.values)]

    def join(self, rows: list[tuple[KVCache, int]]) -> None:
        """Append rows, each (its own B = 1 cache, the token it feeds next), left-padding all to one width."""
        if not rows:
            return
        if self._windowed:
            self._join_window(rows)
        else:
            parts = ([self._list] if self._list is not None else []) + [cache for cache, _ in rows]
            width = max(cache_width(c) for c in parts)
            self._list = [
                (
                    torch.cat([_left_pad(c[layer][0], width) for c in parts]),  # (B', nkv, S', hs)
                    torch.cat([_left_pad(c[layer][1], width) for c in parts]),
                )
                for layer in range(len(parts[0]))
            ]
        self.lengths += [cache_width(cache) for cache, _ in rows]
        self.next_ids += [next_id for _, next_id in rows]

    def _join_window(self, rows: list[tuple[KVCache, int]]) -> None:
        first = rows[0][0]
        if self._window is None:
            def buffer(t: torch.Tensor) -> torch.Tensor:  # zeros: padding columns are masked, never NaN
                return torch.zeros(self._max_rows, t.shape[1], self._columns, t.shape[3], dtype=t.dtype, device=t.device)

            self._window = KVWindow([buffer(k) for k, _ in first], [buffer(v) for _, v in first], 0, 0, 0, 0)
        w = self._window
        if len(self) + len(rows) > w.keys[0].shape[0]:
            raise ValueError(f"the batch holds at most {w.keys[0].shape[0]} rows")
        width = max([self.width] + [cache_width(c) for c, _ in rows])
        if not self.lengths:
            w.start = w.end = 0
        if w.end < width:  # no room on the left for the widest row: move the window right
            self._move_window(width)
        w.start = w.end - width
        for j, (cache, _) in enumerate(rows):
            b, n = len(self) + j, cache_width(cache)
            for layer, (k, v) in enumerate(cache):
                w.keys[layer][b, :, w.end - n : w.end] = k[0]
                w.values[layer][b, :, w.end - n : w.end] = v[0]
        w.row_hi = len(self) + len(rows)

    def _move_window(self, new_end: int) -> None:
        """Copy the window's columns so that it ends at column `new_end`."""
        w = self._window
        assert w is not None
        n, rows = w.length, len(self)
        for buf in (*w.keys, *w.values):
            buf[:rows, :, new_end - n : new_end] = buf[:rows, :, w.start : w.end].clone()
        w.start, w.end = new_end - n, new_end

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices, in order) and cut the leading columns that are padding in all of them."""
        if len(rows) == len(self):
            return
        if not rows:
            self._list, self.lengths, self.next_ids = None, [], []
            if self._window is not None:
                self._window.row_hi = 0
                self._window.start = self._window.end = 0
            return
        start = self.width - max(self.lengths[r] for r in rows)
        index = torch.tensor(rows, device=self.device)
        if self._window is not None:
            w = self._window
            for buf in (*w.keys, *w.values):
                buf[: len(rows), :, w.start : w.end] = buf[index, :, w.start : w.end]  # advanced indexing copies first
            w.start += start
            w.row_hi = len(rows)
        else:
            self._list = [
                (k[:, :, start:].index_select(0, index), v[:, :, start:].index_select(0, index))  # (B', nkv, S', hs)
                for k, v in self._list  # type: ignore[union-attr]
            ]
        self.lengths = [self.lengths[r] for r in rows]
        self.next_ids = [self.next_ids[r] for r in rows]

    def step(self) -> torch.Tensor:
        """Feed every row its next token -> logits (B, V) for the token after it; the cache grows one column.

        The mask is left out when no row is padded, so a batch of one runs exactly `generate`'s call.
        A model whose results depend on the batch (`batch_invariant` False: it quantizes activations
        with one scale per call) decodes each row in a call of its own, so that batching never changes
        a request's output; it gains nothing from batching but keeps continuous scheduling.
        """
        B, S = len(self), self.width
        ids = torch.tensor(self.next_ids, device=self.device).view(B, 1)  # (B, 1)
        lengths = torch.tensor(self.lengths, device=self.device)  # (B,)
        w = self._window
        if w is not None and w.end == w.keys[0].shape[2]:  # the window reached the right edge
            self._move_window(S)
        if B > 1 and not getattr(self.model, "batch_invariant", True):
            logits = self._step_rows(ids, lengths)
        else:
            mask = None
            if min(self.lengths) < S:
                mask = (torch.arange(S + 1, device=self.device)[None, :] >= (S - lengths)[:, None]).long()  # (B, S+1)
            past = w if w is not None else self._list
            logits, cache = self.model(
                ids, past_key_values=past, position_ids=lengths[:, None], attention_mask=mask, use_cache=True
            )  # (B, 1, V)
            if w is None:
                self._list = cache
        if w is not None:
            w.end += 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1, :]

    def _step_rows(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`step`'s forward, one row (B = 1) at a time (a row alone needs neither its padding columns nor
        a mask); returns the rows' logits (B, 1, V) and updates the cache."""
        w = self._window
        outputs = []
        for b in range(len(self)):
            if w is not None:
                past: Any = KVWindow(w.keys, w.values, b, b + 1, w.end - self.lengths[b], w.end)
            else:
                start = self.width - self.lengths[b]
                past = [(k[b : b + 1, :, start:], v[b : b + 1, :, start:]) for k, v in self._list]  # type: ignore[union-attr]
            outputs.append(self.model(
                ids[b : b + 1], past_key_values=past, position_ids=lengths[b : b + 1, None], use_cache=True
            ))  # (1, 1, V), per layer (1, nkv, lengths[b] + 1, hs)
        if w is None:
            width = self.width + 1
            self._list = [
                (
                    torch.cat([_left_pad(out[1][layer][0], width) for out in outputs]),  # (B, nkv, S+1, hs)
                    torch.cat([_left_pad(out[1][layer][1], width) for out in outputs]),
                )
                for layer in range(len(self._list))  # type: ignore[arg-type]
            ]
        return torch.cat([out[0] for out in outputs])


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """A (B, nkv, S, hs) cache tensor with zero columns prepended up to `width`."""
    pad = width - t.shape[2]
    return F.pad(t, (0, 0, pad, 0)) if pad else t
