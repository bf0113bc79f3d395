"""Where a report's files live: report.html and its PNG plots, side by side in one folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import LlmctlError


@dataclass(frozen=True)
class ReportFiles:
    """A report folder: `report.html` plus `report-<name>.png` for each plot.

    The plots carry a `report-` prefix because the default folder is the run or study dir itself,
    where `tune` already writes history.png and importances.png of its own.
    """

    path: Path

    @property
    def html(self) -> Path:
        return self.path / "report.html"

    def plot(self, name: str) -> Path:
        return self.path / f"report-{name}.png"

    def listing(self, plots: list) -> dict:
        """The report's files as --json gives them: the HTML page and each plot (`.path`) by its name."""
        return {"html": str(self.html), "plots": {p.path.stem.removeprefix("report-"): str(p.path) for p in plots}}

    def prepare(self) -> None:
        """Create the folder, refusing a path that names an existing file."""
        if self.path.exists() and not self.path.is_dir():
            raise LlmctlError(f"--out {self.path}: an existing file; name a directory to write the report into.")
        self.path.mkdir(parents=True, exist_ok=True)


def next_compare_dir(root: Path = Path("reports")) -> Path:
    """The first `reports/compare-<n>` (n = 1, 2, ...) that does not exist yet, so no report is overwritten."""
    n = 1
    while (root / f"compare-{n}").exists():
        n += 1
    return root / f"compare-{n}"
