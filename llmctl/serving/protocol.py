"""OpenAI's wire format: request bodies as strict pydantic models with bounds, error objects, and the
logprobs shapes of /v1/completions and /v1/chat/completions; llmctl's own /v1/classify body too.

Strict models: a string where a number belongs ("temperature": "0.5") or a bool where an integer
belongs is refused (400), as OpenAI does, not coerced. Fields OpenAI clients send that llmctl does not
use are ignored, and ones that would change the result without llmctl honouring them are refused.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


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
    user: Optional[str] = None
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


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs: needs logprobs set to true.")
        if self.tools:
            raise Unsupported("tools", "tools: tool calling is not supported by llmctl serve.")

    def engine_logprobs(self) -> int | None:
        """The engine's logprobs parameter: None, 0 (the chosen token's) or k (also the top k)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassificationRequest(_Strict):
    """POST /v1/classify: one text or a list of texts, each answered with a label and its probabilities."""

    model: Optional[str] = None
    input: Union[str, list[str]]
    user: Optional[str] = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check_supported(self) -> None:
        """Refuse an empty batch, too many texts, a blank or an over-long text; raises Unsupported("input")."""
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
    if kind in ("model_attributes_type", "dict_type") and not loc:
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
