"""The chat endpoint's template: the model's own (config.json "chat_template") or llmctl's default.

The template machinery itself (sandboxed Jinja2 rendering in Hugging Face's style, the default
template) lives in llmctl.data.chat_template, which `prepare` also renders instruction data with, so
a model trained on instructions is prompted at serve time exactly as it was trained.
"""

from __future__ import annotations

from typing import Any

from llmctl.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
from llmctl.errors import LlmctlError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatTemplate", "ChatTemplateError", "chat_template_of"]


def chat_template_of(config: dict[str, Any], config_path: str, eos_token: str) -> ChatTemplate:
    """The model's chat template from its config.json, or the default; refuses one that is not a string
    or does not compile, naming the file."""
    template = config.get("chat_template")
    if template is None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, source="the default chat template", eos_token=eos_token)
    if not isinstance(template, str) or not template.strip():
        raise LlmctlError(f"{config_path}: chat_template must be a Jinja2 string, got {type(template).__name__}.")
    return ChatTemplate(template, source=f"{config_path} chat_template", eos_token=eos_token)
