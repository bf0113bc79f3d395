"""Chat templates: the model's own (config.json "chat_template", a Jinja2 string in Hugging Face's
style) or a plain default, always rendered in Jinja2's sandbox.

A template sees what Hugging Face passes its templates: `messages` (a list of {"role", "content"}
dicts), `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception(message)` and the
`tojson` filter, so templates written for HF models work unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from llmctl.errors import LlmctlError

# For a model trained on plain text: role-prefixed turns and an open assistant turn to continue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template rejected them); the client's request is at fault."""


class ChatTemplate:
    """A compiled, sandboxed chat template; `source` says where it came from (for messages)."""

    def __init__(self, template: str, *, source: str, eos_token: str = "", bos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(str(message))

        # trim_blocks / lstrip_blocks: the whitespace rules HF renders its templates with.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.source = source
        self.is_default = template == DEFAULT_CHAT_TEMPLATE
        self._eos, self._bos = eos_token, bos_token
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise LlmctlError(f"{source}: not a valid Jinja2 chat template ({e}); fix or remove it.") from None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; raises ChatTemplateError when the template refuses them."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                eos_token=self._eos, bos_token=self._bos,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:  # undefined names, sandbox violations, errors inside the template
            raise ChatTemplateError(f"the chat template ({self.source}) cannot render these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template ({self.source}) cannot render these messages: {e}") from None


def chat_template_of(config: dict[str, Any], config_path: str, eos_token: str) -> ChatTemplate:
    """The model's chat template from its config.json, or the default; refuses one that is not a string
    or does not compile, naming the file."""
    template = config.get("chat_template")
    if template is None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, source="the default chat template", eos_token=eos_token)
    if not isinstance(template, str) or not template.strip():
        raise LlmctlError(f"{config_path}: chat_template must be a Jinja2 string, got {type(template).__name__}.")
    return ChatTemplate(template, source=f"{config_path} chat_template", eos_token=eos_token)
