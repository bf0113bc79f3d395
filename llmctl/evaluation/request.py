"""What `llmctl eval` is asked (one request for every task) and what it answers: the report `--json`
prints, and which table shows it to a person."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.evaluation.gates import gate_failures


@dataclass(frozen=True)
class Sampling:
    """How a language model's samples are decoded: greedy at temperature 0, else sampled (top-k, top-p)
    from `seed` (the next prompts count up from it)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0


@dataclass
class EvalRequest:
    """`llmctl eval`'s arguments (see its --help); a task's evaluation module reads the ones it takes and
    refuses the others' (`refuse_options`)."""

    paths: list[Path]
    compare: bool = False
    data: Path | None = None  # a dataset dir (a classifier: also a labelled CSV/JSONL file)
    text: list[Path] = field(default_factory=list)  # a language model: text files to score instead
    split: str = "val"
    max_tokens: int | None = None  # a language model: tokens scored at most
    batch_size: int = 8  # a language model: windows per forward
    prompts: list[str] = field(default_factory=list)  # a language model: prompts to continue
    sampling: Sampling = field(default_factory=Sampling)
    predict: Path | None = None  # a classifier: texts to label
    predictions: Path | None = None  # a classifier: where --predict writes
    out: Path | None = None  # a classifier: the folder of eval.json, confusion.png, predictions.jsonl
    max_ppl: float | None = None
    min_f1: float | None = None
    min_accuracy: float | None = None

    def given(self, flags: dict[str, Any]) -> list[str]:
        """Which of `flags` (flag -> its value here) were given."""
        return [flag for flag, value in flags.items() if value is not None and value != []]


@dataclass
class EvalOutcome:
    """An eval's report (what --json prints) and the view a person reads it in (the CLI's table for it)."""

    report: dict[str, Any]
    view: str

    @property
    def failures(self) -> list[str]:
        """The quality gates that failed (exit 3)."""
        return gate_failures(self.report)
