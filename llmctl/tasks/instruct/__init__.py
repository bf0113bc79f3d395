"""Instruction tuning: conversations rendered by a chat template, the loss on response tokens only.

Its model is a language model that was shown conversations, so it is evaluated, compressed, exported,
served and reported as one; only its dataset and its training batches differ.
"""

from llmctl.tasks.base import Task

TASK = Task(
    name="instruct",
    summary="an instruction-tuned language model: conversations, the loss on responses",
    modules={
        "data": "llmctl.tasks.instruct.data",
        "training": "llmctl.tasks.instruct.training",
        **{stage: f"llmctl.tasks.lm.{stage}" for stage in ("evaluation", "compression", "export", "serving", "reporting")},
    },
)
