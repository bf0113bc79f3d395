"""OpenAI's wire format: request bodies as strict pydantic models with bounds, error objects, and the
logprobs shapes of /v1/completions and /v1/chat/completions; llmctl's own /v1/classify body too.

Strict models: a string where a number belongs ("temperature": "0.5") or a bool where an integer
belongs is refused (400), as OpenAI does, not coerced.

Each body is an allow-list: a field not declared here is refused (400 naming it), so a parameter that
would change the output (vLLM's `repetition_penalty`, `min_p`, `guided_json`, ...) is never silently
ignored. Declared fields are honoured; or harmless, accepted and ignored (`user`, `store`, `metadata`,
`service_tier`, ...: they cannot change the output); or accepted only at the value that changes nothing
(`presence_penalty: 0`, `tool_choice: "none"`, ...) and refused otherwise by `check_supported`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS = 4
MAX_CLASSIFY_TEXTS = 256  # texts per /v1/classify request: one forward's worth
MAX_CLASSIFY_CHARS = 20_000  # characters per text; tokenizing is the cost (the model reads max_len tokens of it)


class ApiError(Exception):
    """An error answered as OpenAI's error object {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Unsupported(ValueError):
    """A request field llmctl does not honour, given a value that would matter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # OpenAI's padding of stream events: harmless, none sent


def refuse_unencodable(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode: JSON can spell a lone surrogate ("\\ud800"), which no
    tokenizer takes (nor UTF-8). `where` names the field as the client wrote it, e.g. messages[0].content."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Unsupported(_param_of(where), f"{where}: a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                                            f"{e.start}, which is not valid Unicode; send UTF-8 text.") from None


def _param_of(where: str) -> str:
    """A field path as the client wrote it ("messages[0].content") in the dotted form of `param` ("messages.0.content")."""
    return re.sub(r"\[(\d+)\]", r".\1", where)


def _refuse_unless(name: str, value: Any, neutral: tuple[Any, ...], why: str) -> None:
    """Refuse a field given a value other than one of those that change nothing."""
    if value not in neutral:
        raise Unsupported(name, f"{name}: {why}")


class _GenerationRequest(_Strict):
    """Parameters /v1/completions and /v1/chat/completions share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's; vLLM's name for it
    ignore_eos: bool = False  # not OpenAI's; vLLM's: generate max_tokens tokens whatever the model says (benchmarks)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Harmless: accepted and ignored (they cannot change the output).
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    # Refused unless given the value that changes nothing (check_supported).
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: Optional[dict[str, float]] = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        """Refuse values llmctl would otherwise silently ignore; raises Unsupported."""
        stops = self.stop_strings()
        if len(stops) > MAX_STOPS:
            raise Unsupported("stop", f"stop: at most {MAX_STOPS} strings, got {len(stops)}.")
        if any(s == "" for s in stops):
            raise Unsupported("stop", "stop: a stop string must not be empty.")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise Unsupported(name, f"{name}: not supported by llmctl serve; leave it 0.")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias: not supported by llmctl serve.")


TokenIds = list[int]


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and not self.prompt:
            raise Unsupported("prompt", "prompt: an empty list; give a string, a list of strings or token ids.")
        if self.echo:
            raise Unsupported("echo", "echo: not supported by llmctl serve.")
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of", "best_of: not supported by llmctl serve (only best_of = n).")
        if self.suffix:
            raise Unsupported("suffix", "suffix: not supported by llmctl serve.")
        for where, text in self.prompt_texts():
            refuse_unencodable(text, where)

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(where, text) of each prompt given as text: ("prompt", ...) or ("prompt[i]", ...)."""
        if isinstance(self.prompt, str):
            return [("prompt", self.prompt)]
        return [(f"prompt[{i}]", p) for i, p in enumerate(self.prompt) if isinstance(p, str)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    # What OpenAI's client sends back with an assistant message it got: accepted only empty (a template
    # renders role and content; a refusal or tool call it would drop unseen).
    refusal: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    audio: Optional[Any] = None
    annotations: Optional[list[Any]] = None

    def as_template_input(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self) -> str:
        """The content as one string (text parts joined; none is "")."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return content or ""

    def check_supported(self, where: str) -> None:
        """Refuse what the template would drop and text that is not valid Unicode; `where` is "messages[i]"."""
        for name in ("refusal", "tool_calls", "function_call", "audio", "annotations"):
            if getattr(self, name):
                raise Unsupported(_param_of(f"{where}.{name}"), f"{where}.{name}: not supported by llmctl serve, whose "
                                  "chat template renders each message's role and content only.")
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                refuse_unencodable(part.text, f"{where}.content[{j}].text")
        elif self.content is not None:
            refuse_unencodable(self.content, f"{where}.content")
        if self.name is not None:
            refuse_unencodable(self.name, f"{where}.name")


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    parallel_tool_calls: Optional[bool] = None  # harmless: there are no tools to call
    modalities: Optional[list[str]] = None
    # Refused unless given the value that changes nothing (check_supported).
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[Any]] = None  # OpenAI's legacy names for tools and tool_choice
    function_call: Union[str, dict[str, Any], None] = None
    audio: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[Any] = None

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs: needs logprobs set to true.")
        no_tools = "llmctl serve does not call tools"
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise Unsupported(name, f"{name}: tool calling is not supported by llmctl serve.")
        _refuse_unless("tool_choice", self.tool_choice, (None, "none", "auto"),
                       f"{self.tool_choice!r} needs tools, and {no_tools}; leave it out or send \"none\".")
        _refuse_unless("function_call", self.function_call, (None, "none", "auto"),
                       f"{self.function_call!r} needs functions, and {no_tools}; leave it out or send \"none\".")
        _refuse_unless("modalities", self.modalities, (None, ["text"]), 'llmctl serve answers text only: ["text"].')
        for name, what in (("audio", "audio output"), ("reasoning_effort", "reasoning models"),
                           ("verbosity", "verbosity control"), ("web_search_options", "web search")):
            if getattr(self, name) is not None:
                raise Unsupported(name, f"{name}: llmctl serve has no {what}; leave it out.")
        for i, message in enumerate(self.messages):
            message.check_supported(f"messages[{i}]")

    def engine_logprobs(self) -> int | None:
        """The engine's logprobs parameter: None, 0 (the chosen token's) or k (also the top k)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassificationRequest(_Strict):
    """POST /v1/classify: one text or a list of texts, each answered with a label and its probabilities."""

    model: Optional[str] = None
    input: Union[str, list[str]]
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check_supported(self) -> None:
        """Refuse an empty batch, too many texts, a blank, over-long or invalid text; raises Unsupported("input")."""
        texts = self.texts()
        if not texts:
            raise Unsupported("input", "input: an empty list; give a text or a list of texts.")
        if len(texts) > MAX_CLASSIFY_TEXTS:
            raise Unsupported("input", f"input: at most {MAX_CLASSIFY_TEXTS} texts per request, got {len(texts)}; "
                                       "send them in several requests.")
        where = (lambda i: "input") if isinstance(self.input, str) else (lambda i: f"input[{i}]")
        for i, text in enumerate(texts):
            if not text.strip():
                raise Unsupported("input", f"{where(i)}: the text is empty or only whitespace; a classifier needs "
                                           "words to read.")
            if len(text) > MAX_CLASSIFY_CHARS:
                raise Unsupported("input", f"{where(i)}: {len(text):,} characters, over the {MAX_CLASSIFY_CHARS:,} "
                                           "this server takes per text; shorten it.")
            refuse_unencodable(text, where(i))


_Request = TypeVar("_Request", bound=BaseModel)


def parse_request(raw: bytes, content_type: str | None, model: type[_Request],
                  before: Callable[[dict[str, Any]], None] | None = None) -> _Request:
    """A request body as `model`, or an ApiError (400) saying what is wrong with it. `before` sees the
    parsed JSON object first (to refuse what is too big to validate quickly)."""
    if content_type and not _is_json(content_type):
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json).", code="invalid_json")
    if not raw.strip():
        raise ApiError(400, "the request has no body; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg} at character {e.pos}).", code="invalid_json") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid JSON (it is not UTF-8 text).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json).", code="invalid_json")
    if before is not None:
        before(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(list(e.errors())) from None


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON: application/json or application/*+json, parameters aside."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


# Union fields: pydantic reports one error per member; one plain sentence reads better.
UNION_EXPECTED = {
    "input": "a string or a list of strings",
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of FastAPI's validation errors as a 400 OpenAI error naming the parameter."""
    if not errors:
        return ApiError(400, "invalid request body.")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON ({detail})." if detail else "the body is not valid JSON.",
                        code="invalid_json")
    if kind in ("model_attributes_type", "model_type", "dict_type") and not loc:
        return ApiError(400, "the body must be a JSON object (Content-Type: application/json).", code="invalid_json")
    if kind == "missing" and not loc:
        return ApiError(400, "the request has no body; send a JSON object.", code="invalid_json")
    # Drop the union member tags pydantic adds to the location ("prompt.list[int].0" -> "prompt").
    path: list[str] = []
    for part in loc:
        if "[" in part or part in ("str", "int", "float", "bool", "none", "TextPart", "function-after"):
            break
        path.append(part)
    param = ".".join(path) or None
    top = path[-1] if path else None
    if kind == "extra_forbidden":
        return ApiError(400, f"{param}: not a parameter llmctl serve takes; it refuses what it would otherwise "
                        "ignore (see docs/serve.md for the parameters it accepts).", param=param,
                        code="unknown_parameter")
    if top in UNION_EXPECTED and len(path) < len(loc):
        message = f"{param}: expected {UNION_EXPECTED[top]}."
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
        if "input" in first and kind != "missing":
            shown = repr(first["input"])
            message += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
        message += "."
    return ApiError(400, message, param=param)


def completion_logprobs(tokens: list[Any], token_text: Any, start_offset: int) -> dict[str, Any]:
    """/v1/completions' logprobs object for `tokens` (TokenRecords), text offsets from `start_offset`."""
    return {
        "tokens": [token_text(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            {token_text(i): lp for i, lp in t.top.items()} if t.top is not None else None for t in tokens
        ],
        "text_offset": [start_offset + t.offset for t in tokens],
    }


def chat_logprobs(tokens: list[Any], token_text: Any) -> dict[str, Any]:
    """/v1/chat/completions' logprobs object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""

    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in (t.top or {}).items()]}
            for t in tokens
        ],
        "refusal": None,
    }
