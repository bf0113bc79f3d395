"""What an export returns: whether its check passed, the parity table, its figures and the files written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExportReport:
    """What an export did: whether the export matched the model it came from, the parity table, figures,
    files written; and, for people, the parity table's title and the lines to print under it."""

    passed: bool
    failure: str | None
    rows: list[dict[str, Any]]  # the parity table: output, max_abs, max_rel, worst, passed
    figures: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    title: str = "ONNX Runtime vs PyTorch"
    check: str = "parity check"  # what failed, when it fails
    summary: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as `--json` prints it (the title, check and summary lines are for people)."""
        return {"passed": self.passed, "failure": self.failure, "rows": self.rows, "figures": self.figures,
                "paths": self.paths}
