"""Conversations: JSONL lines of instruction data read strictly into chat messages, naming file:line.

A line is `{"messages": [{"role": ..., "content": ...}, ...]}` (the OpenAI / Hugging Face chat format;
roles system, user, assistant) or `{"prompt": ..., "response": ...}` (with an optional "system").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmctl.config.schema import DataConfig
from llmctl.data.sources import SourceStats, iter_decoded_lines, resolve_source_files
from llmctl.errors import LlmctlError

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One source line as chat messages; `where` is file:line, `form` "messages" or "prompt_response"."""

    where: str
    messages: list[dict[str, str]]
    form: str


_SHAPE_HINT = ('an instruct line is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", '
               '"content": ...}]} or {"prompt": ..., "response": ...}')


def _text(value: Any, what: str, where: str, replace: bool) -> str:
    if not isinstance(value, str):
        raise LlmctlError(f"{where}: {what} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise LlmctlError(f"{where}: {what} is empty; every turn needs text.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes can spell lone surrogates, which no tokenizer accepts
        if not replace:
            raise LlmctlError(f"{where}: {what} holds a lone surrogate escape (not valid Unicode); set "
                              "data.encoding_errors: replace to replace it.") from None
        value = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value


def conversation_of(obj: Any, where: str, *, replace: bool = False) -> Conversation:
    """Check one parsed JSONL line and turn it into chat messages; LlmctlError naming `where` if it is not one."""
    if not isinstance(obj, dict):
        raise LlmctlError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_SHAPE_HINT}.")
    if "messages" in obj:
        turns = obj["messages"]
        if not isinstance(turns, list) or not turns:
            raise LlmctlError(f"{where}: messages must be a non-empty list of {{role, content}} objects.")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise LlmctlError(f"{where}: messages[{i}] must be an object with role and content, got {type(turn).__name__}.")
            role = turn.get("role")
            if role not in ROLES:
                raise LlmctlError(f"{where}: messages[{i}].role is {role!r}; roles are {', '.join(ROLES)}.")
            messages.append({"role": role, "content": _text(turn.get("content"), f"messages[{i}].content", where, replace)})
        if not any(m["role"] == "assistant" for m in messages):
            raise LlmctlError(f"{where}: no assistant turn, so nothing to learn from; add the answer as "
                              '{"role": "assistant", "content": ...}.')
        return Conversation(where, messages, "messages")
    if "prompt" in obj or "response" in obj:
        missing = [k for k in ("prompt", "response") if k not in obj]
        if missing:
            raise LlmctlError(f"{where}: has {'response' if missing == ['prompt'] else 'prompt'} but no {missing[0]}; "
                              f"{_SHAPE_HINT}.")
        messages = []
        if obj.get("system") is not None:
            messages.append({"role": "system", "content": _text(obj["system"], "system", where, replace)})
        messages.append({"role": "user", "content": _text(obj["prompt"], "prompt", where, replace)})
        messages.append({"role": "assistant", "content": _text(obj["response"], "response", where, replace)})
        return Conversation(where, messages, "prompt_response")
    keys = ", ".join(map(str, obj)) or "none"
    raise LlmctlError(f"{where}: neither messages nor prompt/response (keys: {keys}); {_SHAPE_HINT}.")


def read_conversations(data: DataConfig, stats: SourceStats) -> list[Conversation]:
    """Every conversation of `data.sources` (JSONL files), in source order; stops once `data.max_bytes`
    bytes of message text are read (keeping whole conversations)."""
    replace = data.encoding_errors == "replace"
    found: list[Conversation] = []
    text_bytes = 0
    for path, fmt, _ in resolve_source_files(data):
        if fmt != "jsonl":
            raise LlmctlError(
                f"data.sources: {path} is read as {fmt}, but instruct data is JSONL ({_SHAPE_HINT}); name .jsonl "
                "files, or set the source's format: jsonl."
            )
        before = len(found)
        for lineno, line in iter_decoded_lines(path, str(path), replace=replace, stats=stats):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmctlError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); JSON Lines needs one "
                                  "object per line.") from None
            conversation = conversation_of(obj, where, replace=replace)
            size = sum(len(m["content"].encode("utf-8")) for m in conversation.messages)
            if data.max_bytes is not None and text_bytes + size > data.max_bytes and found:
                return found
            text_bytes += size
            found.append(conversation)
            stats.documents += 1
            stats.bytes += size
        if len(found) == before:
            raise LlmctlError(f"{path} holds no conversation: every line is blank (data.sources).")
    return found
