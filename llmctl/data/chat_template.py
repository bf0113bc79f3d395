"""Chat templates in Hugging Face's style: compiled in Jinja2's sandbox, rendered whole or turn by turn
(for the response mask of instruction data), and found beside a model or tokenizer dir.

Prepare renders instruction data with one; training copies it into the model dir's config.json; serve's
chat endpoint renders requests with it.
"""

from __future__ import annotations

import json
from pathlib import Path
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
    """A compiled chat template in Hugging Face's style, always rendered in Jinja2's sandbox.

    It sees what Hugging Face passes its templates: `messages` (a list of {"role", "content"} dicts),
    `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception(message)` and the `tojson`
    filter, so templates written for HF models work unchanged. `source` says where it came from.
    """

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
        self.text = template
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

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_response) pieces, end to end.

        The response piece of an assistant turn is what rendering it adds after the prompt the
        template builds for it; this needs a template whose render of a conversation's beginning is a
        beginning of its render of the whole (true of the usual ones). Raises ChatTemplateError if not.
        """
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1], add_generation_prompt=False)
            for before, after, what in ((done, prompt, f"the prompt for turn {i + 1}"), (prompt, turn, f"turn {i + 1}")):
                if not after.startswith(before):
                    raise ChatTemplateError(
                        f"the chat template ({self.source}) renders {what} so that it does not continue the text "
                        "before it, so the response tokens cannot be told apart; use a template whose rendering "
                        "of a conversation's first turns is the start of its rendering of the whole"
                    )
            pieces += [(prompt[len(done):], False), (turn[len(prompt):], True)]
            done = turn
        whole = self.render(messages, add_generation_prompt=False)
        if not whole.startswith(done):
            raise ChatTemplateError(f"the chat template ({self.source}) renders the whole conversation so that it "
                                    "does not continue its turns")
        pieces.append((whole[len(done):], False))
        return [(text, response) for text, response in pieces if text]


def chat_template_beside(folder: Path) -> tuple[str, str] | None:
    """(template, where) of the chat template a model or tokenizer dir carries, if any: llmctl's
    config.json "chat_template", or Hugging Face's chat_template.jinja or tokenizer_config.json
    "chat_template" (a string, or a list of named templates of which "default" is taken)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            found = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(found, list):
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(found, str) and found.strip():
            return found, f"{path} chat_template"
    return None


def resolve_chat_template(chat_template: str | None, tokenizer: str | None, init_from: str | None) -> tuple[str, str]:
    """(template, where it came from): `data.chat_template`, else the one beside `data.tokenizer` (the
    model dir or Hugging Face dir it belongs to), else model.init_from's, else llmctl's default."""
    if chat_template:
        return chat_template, "data.chat_template"
    for folder in (Path(tokenizer).parent if tokenizer else None, Path(init_from) if init_from else None):
        if folder is not None and folder.is_dir():
            found = chat_template_beside(folder)
            if found:
                return found
    return DEFAULT_CHAT_TEMPLATE, "llmctl's default chat template"
