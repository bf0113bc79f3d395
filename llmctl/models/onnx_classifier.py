"""An exported sequence classifier run by ONNX Runtime, called like the torch classifier: `model(ids, lengths)`.

The graph (written by `llmctl export`, see llmctl/export/classifier_onnx.py) takes `input_ids`
(batch, sequence) int64, right-padded, and `lengths` (batch,) int64, and returns `logits`
(batch, 1) for two classes (a sigmoid), else (batch, num_classes). Positions at or past a row's
length never reach its logits, so any padding id and any extra padding columns give the same result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.artifacts import read_json_artifact
from llmctl.errors import LlmctlError

INPUTS = ("input_ids", "lengths")
OUTPUT = "logits"
TASK = "classification"


class OnnxClassifier:
    """ONNX Runtime behind the torch classifier call `model(input_ids (B, T), lengths (B,)) -> logits (B, n_out)`.

    Takes and returns torch CPU tensors; `config` is the model's config.json (labels, max_len,
    pad_id, num_classes, ...).
    """

    task = TASK

    def __init__(self, export_dir: Path, file: str = "model.onnx", providers: list[str] | None = None,
                 spin_threads: bool = True):
        from llmctl.models.onnx_model import check_export_dir, open_session

        layout = check_export_dir(export_dir, file)
        manifest = read_json_artifact(layout.manifest, "export dir")
        self.config: dict[str, Any] = read_json_artifact(layout.config, "export dir")
        self.config.pop("format_version", None)
        if self.config.get("num_classes") is None:
            raise LlmctlError(f"{layout.config}: records no num_classes; this export dir does not hold a classifier.")
        self.num_classes = int(self.config["num_classes"])
        self.graph_path = layout.path / file
        self.device = torch.device("cpu")
        self._parameters = int(manifest.get("parameters") or 0)
        self.session = open_session(self.graph_path, providers, spin_threads)
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUTS or [o.name for o in self.session.get_outputs()][:1] != [OUTPUT]:
            raise LlmctlError(
                f"{self.graph_path}: inputs {list(names)}, expected {list(INPUTS)} and output {OUTPUT!r}; "
                "not a classifier graph written by `llmctl export`: export the model dir again."
            )
        from llmctl.models.onnx_model import _quantizes_activations

        # An int8 graph quantizes activations with one scale per call: a row's result depends on its batch.
        self.batch_invariant = not _quantizes_activations(self.graph_path)

    @property
    def max_len(self) -> int | None:
        """Tokens per text the model was trained on (callers truncate to it), as config.json records."""
        value = self.config.get("max_len")
        return int(value) if value is not None else None

    def eval(self) -> "OnnxClassifier":
        return self

    def num_parameters(self) -> int:
        """Parameters of the exported model, as export.json records."""
        return self._parameters

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_out) float32 for right-padded token ids (B, T) with real lengths (B,)."""
        feed = {
            "input_ids": np.ascontiguousarray(input_ids.detach().cpu().numpy(), dtype=np.int64),
            "lengths": np.ascontiguousarray(lengths.detach().cpu().numpy(), dtype=np.int64),
        }
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])  # (B, n_out)
