"""Quality gates of `llmctl eval` for CI (`--max-ppl`, `--min-f1`, `--min-accuracy`): one list of the
gates that failed, recorded in the report under `gate`; the CLI says each and exits 3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gate:
    """A bound on one figure of a report: a ceiling (`--max-ppl`) or a floor (`--min-f1`)."""

    key: str  # the limit's name in the report's `gate` (and the flag's, with dashes)
    figure: str  # the figure as a failure names it
    digits: int  # decimals the failure shows the figure with
    ceiling: bool

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def failure(self, value: float | None, limit: float) -> str | None:
        """What failed ("perplexity 12.300 > --max-ppl 10.0"), or None when the figure is within the bound
        (or was not measured)."""
        if value is None or not (value > limit if self.ceiling else value < limit):
            return None
        return f"{self.figure} {value:.{self.digits}f} {'>' if self.ceiling else '<'} {self.flag} {limit}"


GATES = {
    "max_ppl": Gate("max_ppl", "perplexity", 3, ceiling=True),
    "min_f1": Gate("min_f1", "macro-F1", 4, ceiling=False),
    "min_accuracy": Gate("min_accuracy", "accuracy", 4, ceiling=False),
}


def judge(report: dict[str, Any], limits: dict[str, float | None], figures: dict[str, float | None]) -> list[str]:
    """The failures of the gates a task takes (`limits`: gate key -> the bound asked for, None: not asked)
    against its `figures` (gate key -> the measured figure). When any bound is asked, the report records
    `gate`: every limit of the task, whether all passed, and the failures."""
    if all(limit is None for limit in limits.values()):
        return []
    failures = [failure for key, limit in limits.items()
                if limit is not None and (failure := GATES[key].failure(figures.get(key), limit)) is not None]
    report["gate"] = {**limits, "passed": not failures, "failures": failures}
    return failures


def gate_failures(report: dict[str, Any]) -> list[str]:
    """The failures a judged report records (none when no gate was asked)."""
    return list((report.get("gate") or {}).get("failures") or [])
