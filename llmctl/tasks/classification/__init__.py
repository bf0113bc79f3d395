"""Classification: labelled texts to one of a few classes; accuracy, precision, recall and F1."""

from llmctl.tasks.base import Task

TASK = Task(
    name="classification",
    summary="a text classifier: labelled texts; accuracy, precision, recall, F1",
    modules={stage: f"llmctl.tasks.classification.{stage}" for stage in
             ("data", "training", "evaluation", "compression", "export", "serving", "reporting")},
)
