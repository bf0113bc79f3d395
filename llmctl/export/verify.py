"""Parity of an exported graph with the PyTorch model it came from: the table rows every task's check fills.

A task's parity check (`llmctl/tasks/<task>/parity.py`) runs both backends on the same inputs and folds
every output tensor into a `Tally` per output group; the worst case of each becomes a `ParityRow`, and
`parity_failure` words the first difference that broke the tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

HINT = (
    "try a newer opset (--opset 18 or above), make sure the model is fp32, "
    "or loosen --atol if a difference this size is acceptable"
)


@dataclass
class ParityRow:
    """The largest difference of one output (present.* summarised over layers) over every step."""

    output: str  # logits, present.*.key, present.*.value
    max_abs: float
    max_rel: float  # the largest |onnx - torch| of a tensor over its largest |torch|
    worst: str  # which tensor and step the largest max_abs came from
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParityResult:
    passed: bool
    failure: str | None
    rows: list[ParityRow]
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = [r.to_dict() for r in self.rows]
        return {"passed": self.passed, "failure": self.failure, "rows": rows, **self.figures}


class Tally:
    """Running worst case of one output group."""

    def __init__(self, output: str):
        self.row = ParityRow(output, 0.0, 0.0, "", True)

    def add(self, name: str, where: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float | None) -> str | None:
        """Fold one tensor in; returns what went wrong if it breaks the tolerance."""
        ref = ref.float()
        diff = (got.float() - ref).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        if max_abs > self.row.max_abs or not self.row.worst:
            self.row.max_abs, self.row.worst = max_abs, f"{name} at {where}"
        self.row.max_rel = max(self.row.max_rel, max_rel)
        allowed = atol + rtol * ref.abs() if rtol else atol
        if bool((diff > allowed).any()) or not np.isfinite(max_abs):
            self.row.passed = False
            return f"{name} differs by up to {max_abs:.3g} at {where}"
        return None


def parity_failure(failures: list[str], atol: float, rtol: float | None, mismatch: str | None) -> str | None:
    """The failure of a parity check: the first tensor beyond the tolerance (`failures`, in the order the
    model computes them), else `mismatch` (the first differing pick, already worded), else None."""
    if failures:
        tolerance = f"atol {atol:g}" + (f", rtol {rtol:g}" if rtol else "")
        return f"ONNX Runtime and PyTorch disagree: {failures[0]} ({tolerance}); {HINT}."
    if mismatch:
        return f"{mismatch}; {HINT}."
    return None
