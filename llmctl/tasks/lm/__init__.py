"""Language modelling: next-token prediction over token shards of text; perplexity, generation."""

from llmctl.tasks.base import Task

TASK = Task(
    name="lm",
    summary="a language model: next-token prediction over text; perplexity and generation",
    modules={stage: f"llmctl.tasks.lm.{stage}" for stage in
             ("data", "training", "evaluation", "compression", "export", "serving", "reporting")},
)
