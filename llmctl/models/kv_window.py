"""A preallocated KV cache that attention writes into in place, for decoding many steps in a row.

The plain cache (a list of per-layer (k, v)) grows by `torch.cat` at every step, copying the whole
cache each time: for 16 rows of the tiny model that copy was 44% of a decode step. A `KVWindow`
instead holds per-layer buffers (rows, n_kv_head, capacity, head_size) and a window of columns
[start, end) in use; attention writes the new columns at `end` and reads a view of the window. The
owner (the serving batch) moves `end` on after each forward and decides where rows and columns live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVWindow:
    """Rows [row_lo, row_hi) and columns [start, end) of per-layer key and value buffers."""

    keys: list[torch.Tensor]  # per layer (rows_capacity, n_kv_head, capacity, head_size)
    values: list[torch.Tensor]
    row_lo: int
    row_hi: int
    start: int
    end: int

    @property
    def length(self) -> int:
        """Past positions the window holds (columns)."""
        return self.end - self.start

    def layer(self, index: int) -> "KVLayer":
        return KVLayer(self, index)


@dataclass
class KVLayer:
    """One layer's part of a window, what the attention of that layer receives as its past."""

    window: KVWindow
    index: int

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, n_kv_head, T, hs) at the window's end -> views of past + new."""
        w = self.window
        stop = w.end + k.shape[2]
        key, value = w.keys[self.index], w.values[self.index]
        key[w.row_lo : w.row_hi, :, w.end : stop] = k
        value[w.row_lo : w.row_hi, :, w.end : stop] = v
        return key[w.row_lo : w.row_hi, :, w.start : stop], value[w.row_lo : w.row_hi, :, w.start : stop]
