"""An exported sequence classifier run by ONNX Runtime, called like the torch classifier: `model(ids, lengths)`.

The graph (written by `llmctl export`, see llmctl/tasks/classification/export.py) takes `input_ids`
(batch, sequence) int64, right-padded, and `lengths` (batch,) int64, and returns `logits`
(batch, 1) for two classes (a sigmoid), else (batch, num_classes). Positions at or past a row's
length never reach its logits, so any padding id and any extra padding columns give the same result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmctl.errors import LlmctlError
from llmctl.models.ort_session import OrtModel, open_export_graph

INPUTS = ("input_ids", "lengths")
OUTPUT = "logits"
TASK = "classification"


class OnnxClassifier(OrtModel):
    """ONNX Runtime behind the torch classifier call `model(input_ids (B, T), lengths (B,)) -> logits (B, n_out)`.

    Takes and returns torch CPU tensors; `config` is the model's config.json (labels, max_len,
    pad_id, num_classes, ...).
    """

    task = TASK

    def __init__(self, export_dir: Path, file: str = "model.onnx", providers: list[str] | None = None,
                 spin_threads: bool = True):
        # An int8 graph quantizes activations with one scale per call: a row's result depends on its batch
        # (`batch_invariant`).
        graph = open_export_graph(export_dir, file, providers, spin_threads)
        if graph.config.get("num_classes") is None:
            raise LlmctlError(f"{graph.layout.config}: records no num_classes; this export dir does not hold a classifier.")
        super().__init__(graph)
        self.num_classes = int(self.config["num_classes"])
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUTS or [o.name for o in self.session.get_outputs()][:1] != [OUTPUT]:
            raise LlmctlError(
                f"{self.graph_path}: inputs {list(names)}, expected {list(INPUTS)} and output {OUTPUT!r}; "
                "not a classifier graph written by `llmctl export`: export the model dir again."
            )

    @property
    def max_len(self) -> int | None:
        """Tokens per text the model was trained on (callers truncate to it), as config.json records."""
        value = self.config.get("max_len")
        return int(value) if value is not None else None

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_out) float32 for right-padded token ids (B, T) with real lengths (B,)."""
        feed = {
            "input_ids": np.ascontiguousarray(input_ids.detach().cpu().numpy(), dtype=np.int64),
            "lengths": np.ascontiguousarray(lengths.detach().cpu().numpy(), dtype=np.int64),
        }
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])  # (B, n_out)
