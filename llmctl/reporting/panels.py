"""What a task adds to `llmctl report`: the figures and plots of a run (`RunPanels`) and the axes and
table of a compare (`ComparePanels`). Each task's reporting module (`llmctl.tasks.<task>.reporting`)
defines `RUN` and `COMPARE`; runs.py and compare.py draw the rest, the same for every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class RunPanels:
    """A task's part of a run's report."""

    label: str  # the report's `task` ("lm", "classifier")
    kind: str  # what the page's subtitle calls the model ("language model", "classifier")
    loss_unit: str  # what the loss is averaged over ("token", "example")
    summarize: Callable[[Any, dict[str, Any]], dict[str, Any]]  # (RunMetrics, summary so far) -> the task's figures
    facts: Callable[[dict[str, Any]], list[tuple[str, str]]]  # the summary's task lines, after the losses
    plots: Callable[[Any, Any], list[Any]]  # (RunMetrics, ReportFiles) -> the task's Plots, after the shared ones


@dataclass(frozen=True)
class ComparePanels:
    """A task's part of a compare's report: the quality figures drawn against size and latency, the table."""

    label: str  # the report's `task` ("lm", "classifier")
    models: str  # what the page's title calls them ("models", "classifiers")
    quality: tuple[tuple[str, str, str], ...]  # (row key, legend label, marker) of each quality figure
    quality_title: str  # "perplexity", "accuracy and macro-F1"
    y_name: str  # the quality in plot file names: size-vs-<y_name>
    y_label: str  # the quality axis
    latency_caption: str  # how forward latency was timed, ending the latency plot's caption
    scored: Callable[[dict[str, Any]], str]  # what the compare scored on ("4,096 tokens")
    table: Callable[[list[dict[str, Any]]], tuple[list[str], list[list[str]]]]  # rows -> (header, body)
    numeric: frozenset[int] = frozenset({2, 3, 4, 5, 6})  # the table's right-aligned columns

    @property
    def quality_legend(self) -> bool:
        """Several quality figures are drawn as marker shapes that the legend names."""
        return len(self.quality) > 1


def timing_mark(row: dict[str, Any]) -> str:
    """` *` after a timing whose rounds disagreed (the note under the table says why)."""
    return " *" if row.get("timing_disturbed") else ""


def number(value: Any, fmt: str) -> str:
    """A table cell: `value` formatted, or "-" when not measured."""
    return "-" if value is None else format(value, fmt)
