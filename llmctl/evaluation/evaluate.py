"""`llmctl eval` as one importable call: score one model, or profile several side by side, by the
evaluation module of their task (`llmctl.tasks.<task>.evaluation`: `refuse_options`, `evaluate`,
`compare`)."""

from __future__ import annotations

from llmctl.errors import LlmctlError
from llmctl.evaluation.request import EvalOutcome, EvalRequest
from llmctl.evaluation.targets import model_task, one_evaluation
from llmctl.progress import Progress


def evaluate(request: EvalRequest, progress: Progress | None = None) -> EvalOutcome:
    """The report of `request` (its gates judged: see `EvalOutcome.failures`); LlmctlError for bad input."""
    if request.compare:
        evaluation = one_evaluation(request.paths)
        evaluation.refuse_options(request)
        return evaluation.compare(request, progress)
    if len(request.paths) > 1:
        raise LlmctlError(f"{len(request.paths)} dirs given; pass --compare to profile several side by side.")
    evaluation = model_task(request.paths[0]).evaluation
    evaluation.refuse_options(request)
    return evaluation.evaluate(request, progress)
