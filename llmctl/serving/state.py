"""What the HTTP layer serves: one model of one task, its tokenizer and limits, and its runner once loaded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmctl.serving.metrics import ServerMetrics
from llmctl.serving.prompts import PromptEncoder
from llmctl.serving.protocol import ApiError

RETRY_AFTER_LOADING_S = 2


@dataclass
class ServingState:
    """Filled in before listening, except `engine`, set once the model loads.

    `task` names the task whose routes are mounted (`llmctl.tasks`); the fields after `metrics` that a
    task does not use keep their defaults (a classifier has no chat template and no max_tokens).
    """

    model_name: str
    tokenizer: Any  # tokenizers.Tokenizer
    context_length: int  # tokens, prompt and completion together (a classifier: tokens it reads per text)
    vocab_size: int
    metrics: ServerMetrics
    task: str = "lm"
    eot_id: int = 0  # a language model's end-of-text id (a classifier: its pad id)
    max_tokens_limit: int = 0  # a language model: the largest max_tokens a request may ask for
    chat_template: Any = None  # a language model's serving.chat.ChatTemplate
    classifier: Any = None  # a classifier's serving.classify.ClassifierSpec
    api_key: str | None = None
    backend: str = "torch"
    engine: Any = None  # the model's runner (serving.runner.Runner): the generation Engine, a ClassifierRunner
    status: str = "loading"  # loading | ready | failed | stopping
    failure: str | None = None
    open_streams: int = 0  # choices being streamed now
    created: int = field(default_factory=lambda: int(time.time()))
    prompts: PromptEncoder = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = PromptEncoder(self.tokenizer, self.context_length)

    def require_engine(self) -> Any:
        """The runner, or the 503 that says why there is none yet (loading, stopping, failed)."""
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "loading":
            raise ApiError(503, f"the model {self.model_name} is still loading; retry shortly.", type="server_error",
                           code="model_loading", headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})
        if self.status == "stopping":
            raise ApiError(503, "the server is shutting down.", type="server_error", code="shutting_down")
        raise ApiError(503, f"the model failed to load: {self.failure}", type="server_error", code="model_failed")
