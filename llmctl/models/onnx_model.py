"""An exported decoder run by ONNX Runtime, called like the torch `gpt` model.

The graph's inputs and outputs follow HF Optimum's names: `input_ids` (B, T), `attention_mask`
(B, P+T), `position_ids` (B, T), `past_key_values.{i}.key|value` (B, n_kv_head, P, head_size) in;
`logits` (B, T, V) and `present.{i}.key|value` (B, n_kv_head, P+T, head_size) out. The first step
passes an empty past (P = 0); the same graph serves prefill, chunked prefill and decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmctl.models.ort_session import OrtModel, open_export_graph

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def input_names(n_layer: int) -> list[str]:
    """The decoder graph's input names, in graph order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    """The decoder graph's output names, in graph order."""
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value"))]


class OnnxCausalLM(OrtModel):
    """ONNX Runtime behind the torch `gpt` call: `model(ids, past_key_values=, position_ids=, attention_mask=, use_cache=)`.

    Takes and returns torch CPU tensors; an absent cache, mask or positions is filled in as the torch
    model would (empty past, every key real, positions counting on from the past).
    """

    def __init__(self, export_dir: Path, file: str = "model.onnx", providers: list[str] | None = None,
                 spin_threads: bool = True):
        # An int8 graph quantizes each MatMul's activations with one scale over the whole input, so a
        # row's result depends on the rows batched with it (`batch_invariant`; see llmctl.serving.batch).
        super().__init__(open_export_graph(export_dir, file, providers, spin_threads))
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layer = len(past) // 2
        _, self.n_kv_head, _, self.head_size = past[0].shape  # (B, n_kv_head, P, head_size)
        self._outputs = output_names(self.n_layer)

    @property
    def context_length(self) -> int:
        return int(self.config["context_length"])

    def __call__(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) for token ids (B, T); with use_cache also the new per-layer (k, v)."""
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.int64)
        if position_ids is None:
            position_ids = torch.arange(P, P + T).expand(B, T)
        feed = {
            "input_ids": _int64(input_ids),
            "attention_mask": _int64(attention_mask),
            "position_ids": _int64(position_ids),
        }
        empty = np.zeros((B, self.n_kv_head, 0, self.head_size), dtype=np.float32)  # (B, nkv, 0, hs)
        for i in range(self.n_layer):
            k, v = (_float32(t) for t in past_key_values[i]) if past_key_values else (empty, empty)
            feed[f"past_key_values.{i}.key"] = k
            feed[f"past_key_values.{i}.value"] = v
        outputs = self.session.run(self._outputs if use_cache else self._outputs[:1], feed)
        logits = torch.from_numpy(outputs[0])  # (B, T, V)
        if not use_cache:
            return logits
        presents = [
            (torch.from_numpy(outputs[1 + 2 * i]), torch.from_numpy(outputs[2 + 2 * i])) for i in range(self.n_layer)
        ]
        return logits, presents


def _int64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)


def _float32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
