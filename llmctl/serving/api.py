"""The HTTP API: OpenAI's /v1/completions, /v1/chat/completions and /v1/models over the generation
engine, or llmctl's /v1/classify over a classifier (classify.py), plus /health and /metrics, as a
FastAPI app. A server serves one model, so each of those endpoints answers only for its kind of model
and refuses the other kind with a 400 that names the endpoint to use.

Every refusal is OpenAI's error object with a 4xx status (bad input), 401 (API key), or 503 (loading,
a full queue: with Retry-After). A client that goes away cancels its engine requests, so its batch
slots are freed at the next decode step.

The event loop only moves bytes: a request's body is capped while it streams in (413 past
MAX_BODY_BYTES, whatever its framing), and parsing it, checking it and tokenizing its text run in a
worker thread, on text already bounded by the context (prompts.py), so that one request never stalls
the others, their streams or /health.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmctl.serving.chat import ChatTemplate, ChatTemplateError
from llmctl.serving.decoding import ChoicePiece, ChoiceStats, EngineFailure, StopStrings, choice_pieces
from llmctl.serving.metrics import ServerMetrics
from llmctl.serving.prompts import PromptEncoder
from llmctl.serving.protocol import (
    MAX_CLASSIFY_TEXTS,
    ApiError,
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    Unsupported,
    chat_logprobs,
    completion_logprobs,
    error_body,
    parse_request,
    validation_error,
)

# Labels of llmctl_requests_total: the routes, and "other" for any path (never the raw path: unbounded).
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/health", "/metrics")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 16 * 2**20
# Commas and colons in a body: a bound on its JSON values. Parsing and validating holds the GIL, ~1 s for
# the ~8M values 16 MiB can spell ("[1,1,...]", 2 cores), stalling the event loop from any thread; at
# this bound it is ~0.1 s. No request that fits a context needs so many (token ids: one per token).
MAX_BODY_SEPARATORS = 2**19
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_LOADING_S = 2
# Server-sent events per second, all streams together, before a stream's tokens are grouped into fewer
# events: each event costs the event loop tens of microseconds (JSON, HTTP framing, a send) that the
# model's threads want too. A lone stream still gets each token as its own event; 16 streams get one
# at most every 8 ms each (bench_serve, 2 CPU cores: ~+10% tokens/s at 16 clients).
STREAM_EVENTS_PER_S = 2000


@dataclass
class ServingState:
    """What the HTTP layer serves: filled in before listening, except `engine`, set once the model loads."""

    model_name: str
    tokenizer: Any  # tokenizers.Tokenizer
    eot_id: int
    context_length: int  # tokens, prompt and completion together
    vocab_size: int
    max_tokens_limit: int
    chat_template: ChatTemplate
    metrics: ServerMetrics
    api_key: str | None = None
    backend: str = "torch"
    classifier: Any = None  # a classify.ClassifierSpec when the model is a classifier, else None (generation)
    engine: Any = None  # the generation Engine, or a classifier's ClassifierRunner
    status: str = "loading"  # loading | ready | failed | stopping
    failure: str | None = None
    open_streams: int = 0  # choices being streamed now
    created: int = field(default_factory=lambda: int(time.time()))
    prompts: PromptEncoder = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = PromptEncoder(self.tokenizer, self.context_length)

    def require_engine(self) -> Any:
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "loading":
            raise ApiError(503, f"the model {self.model_name} is still loading; retry shortly.", type="server_error",
                           code="model_loading", headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})
        if self.status == "stopping":
            raise ApiError(503, "the server is shutting down.", type="server_error", code="shutting_down")
        raise ApiError(503, f"the model failed to load: {self.failure}", type="server_error", code="model_failed")


def create_app(state: ServingState) -> FastAPI:
    """The FastAPI app serving `state`'s model; the engine may arrive later (`state.engine`)."""
    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gatekeeper, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: answer in OpenAI's shape; uvicorn logs the traceback, the server lives on.
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"), 500)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": state.status, "model": state.model_name, "backend": state.backend}
        if state.status == "ready":
            return JSONResponse(body)
        if state.failure:
            body["error"] = state.failure
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    def model_card() -> dict[str, Any]:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmctl",
                "max_model_len": state.context_length}
        if state.classifier is not None:
            card.update(task="classification", labels=list(state.classifier.labels))
        return card

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, "/v1/chat/completions")

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        arrived = time.perf_counter()
        _require_task(state, "classification", "/v1/classify")
        raw = await _body(request)
        if raw is None:  # the client went away, or the body passed the cap (answered 413)
            return Response(status_code=499)
        runner, texts, ids, lengths = await run_in_threadpool(_prepare_classify, state, raw,
                                                              request.headers.get("content-type"))
        return await _classify(state, runner, texts, ids, lengths, request, arrived)

    return app


# --------------------------------------------------------------------------- reading and checking a request


async def _body(request: Request) -> bytes | None:
    """The request's body (capped by _Gatekeeper), or None if the client went away or the cap refused it."""
    try:
        return await request.body()
    except ClientDisconnect:
        return None


async def _generate(state: ServingState, request: Request, endpoint: str) -> Response:
    """/v1/completions or /v1/chat/completions: the body read on the event loop, parsed, checked and
    tokenized in a worker thread, then generated and answered on the event loop."""
    arrived = time.perf_counter()
    _require_task(state, "generation", endpoint)
    raw = await _body(request)
    if raw is None:
        return Response(status_code=499)
    prepare = _prepare_chat if endpoint == "/v1/chat/completions" else _prepare_completion
    job = await run_in_threadpool(prepare, state, raw, request.headers.get("content-type"), arrived)
    return await job.respond(request)


def _prepare_completion(state: ServingState, raw: bytes, content_type: str | None, arrived: float) -> "_Job":
    """A /v1/completions body as a job ready to submit (worker thread); ApiError for a bad request."""
    body = parse_request(raw, content_type, CompletionRequest, before=_list_bounds(state))
    engine = state.require_engine()
    _check_request(state, body)
    prompts = [_prompt_ids(state, p, where) for where, p in _prompt_list(body.prompt)]
    return _Job(state, engine, body, prompts, chat=False, logprobs=body.logprobs, param="prompt", arrived=arrived)


def _prepare_chat(state: ServingState, raw: bytes, content_type: str | None, arrived: float) -> "_Job":
    """A /v1/chat/completions body as a job ready to submit (worker thread); ApiError for a bad request."""
    body = parse_request(raw, content_type, ChatCompletionRequest, before=_list_bounds(state))
    engine = state.require_engine()
    _check_request(state, body)
    try:
        prompt = state.prompts.chat_ids(state.chat_template, [m.as_template_input() for m in body.messages])
    except ChatTemplateError as e:
        raise ApiError(400, str(e), param="messages") from None
    return _Job(state, engine, body, [prompt or [state.eot_id]], chat=True, logprobs=body.engine_logprobs(),
                param="messages", arrived=arrived)


def _prepare_classify(state: ServingState, raw: bytes, content_type: str | None) -> tuple[Any, list[str], Any, Any]:
    """A /v1/classify body's runner, texts, and their token ids and lengths (worker thread); ApiError if bad."""
    from llmctl.errors import LlmctlError

    body = parse_request(raw, content_type, ClassificationRequest, before=_list_bounds(state))
    runner = state.require_engine()
    _check_request(state, body)
    texts = body.texts()
    try:
        ids, lengths = state.classifier.encode(state.prompts.plain, texts)
    except LlmctlError as e:  # a text the tokenizer reads as no tokens at all
        raise ApiError(400, f"input: {e.message}", param="input") from None
    return runner, texts, ids, lengths


def _list_bounds(state: ServingState) -> Callable[[dict[str, Any]], None]:
    """A check of a parsed body that refuses a list too long for any request before each item is validated
    (for millions of items that alone would hold the GIL for seconds): a prompt or message list longer
    than the context (every prompt needs a token of it, every token id is one, a message renders to one
    at least), or more texts to classify than a request takes."""
    limit = state.context_length

    def refuse(data: dict[str, Any]) -> None:
        prompt, messages, texts = data.get("prompt"), data.get("messages"), data.get("input")
        if isinstance(prompt, list):
            longest = max([len(prompt)] + [len(p) for p in prompt[: limit + 1] if isinstance(p, list)])
            if longest > limit:
                raise ApiError(400, f"prompt: a list of {longest:,} items cannot fit this model's context of {limit} "
                               "tokens.", param="prompt", code="context_length_exceeded")
        if isinstance(messages, list) and len(messages) > limit:
            raise ApiError(400, f"messages: {len(messages):,} messages cannot fit this model's context of {limit} "
                           "tokens.", param="messages", code="context_length_exceeded")
        if isinstance(texts, list) and len(texts) > MAX_CLASSIFY_TEXTS:
            raise ApiError(400, f"input: at most {MAX_CLASSIFY_TEXTS} texts per request, got {len(texts):,}; send them "
                           "in several requests.", param="input")

    return refuse


def _check_model(state: ServingState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {state.model_name!r}.",
                       param="model", code="model_not_found")


def _require_task(state: ServingState, task: str, endpoint: str) -> None:
    """Refuse an endpoint of the other kind of model with a 400 naming the endpoints this one serves."""
    served = "generation" if state.classifier is None else "classification"
    if task == served:
        return
    if served == "classification":
        raise ApiError(400, f"{state.model_name} is a classifier (labels {', '.join(state.classifier.labels)}), not a "
                       f"language model, so {endpoint} is not served here; POST the texts to /v1/classify as "
                       '{"input": ["text", ...]}.', code="wrong_endpoint")
    raise ApiError(400, f"{state.model_name} is a language model, not a classifier, so {endpoint} is not served "
                   "here; use /v1/completions or /v1/chat/completions.", code="wrong_endpoint")


def _check_request(state: ServingState, body: Any) -> None:
    _check_model(state, body.model)
    try:
        body.check_supported()
    except Unsupported as e:
        raise ApiError(400, str(e), param=e.param) from None
    if getattr(body, "max_tokens", None) is not None and body.max_tokens > state.max_tokens_limit:
        raise ApiError(400, f"max_tokens: at most {state.max_tokens_limit} on this server, got {body.max_tokens}.",
                       param="max_tokens", code="max_tokens_exceeded")


def _prompt_list(prompt: Any) -> list[tuple[str, str | list[int]]]:
    """OpenAI's four prompt forms as a list of (where, prompt): each text or token ids, and its field."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return [("prompt", prompt)]
    return [(f"prompt[{i}]", p) for i, p in enumerate(prompt)]


def _prompt_ids(state: ServingState, prompt: str | list[int], where: str) -> list[int]:
    if isinstance(prompt, str):
        ids = state.prompts.text_ids(prompt, where)
    else:
        bad = [i for i in prompt if not 0 <= i < state.vocab_size]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is outside this model's vocabulary (0..{state.vocab_size - 1}).",
                           param="prompt")
        ids = list(prompt)
    # An empty prompt starts a fresh document: the model continues from an end-of-text token.
    return ids or [state.eot_id]


# --------------------------------------------------------------------------- one request's classification


async def _classify(state: ServingState, runner: Any, texts: list[str], ids: Any, lengths: Any, request: Request,
                    arrived: float) -> Response:
    """Queue encoded texts for the classifier's thread, answer labels and probabilities in input order."""
    from llmctl.serving.classify import QueueFull, RunnerStopped

    spec = state.classifier
    try:
        future = runner.submit(ids, lengths)
    except QueueFull:
        raise ApiError(503, "the server's queue is full; retry shortly.", type="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)}) from None
    except RunnerStopped:
        raise ApiError(503, "the server is shutting down.", type="server_error", code="shutting_down") from None
    try:
        probs = await _unless_disconnected(request, asyncio.wrap_future(future))
    except Exception as e:  # the forward itself failed: a bug or a broken model, not bad input
        raise ApiError(500, f"classification failed: {type(e).__name__}: {e}", type="server_error") from None
    if probs is None:  # the client went away (its request was dropped if it had not run yet)
        return Response(status_code=499)
    tokens = int(lengths.sum())
    metrics = state.metrics
    metrics.classified_texts.inc(len(texts))
    metrics.classified_tokens.inc(tokens)
    metrics.classify_latency.observe(time.perf_counter() - arrived)
    return JSONResponse({
        "id": "classify-" + uuid.uuid4().hex, "object": "classification", "created": int(time.time()),
        "model": state.model_name, "data": spec.results(probs),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


# --------------------------------------------------------------------------- one request's generation


class _Job:
    """One API request: its prompts x n engine requests, answered as one JSON body or one event stream."""

    def __init__(self, state: ServingState, engine: Any, body: Any, prompts: list[list[int]], *, chat: bool,
                 logprobs: int | None, param: str, arrived: float):
        self.state, self.engine, self.body, self.prompts = state, engine, body, prompts
        self.chat, self.logprobs, self.arrived = chat, logprobs, arrived
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.max_tokens = [self._max_tokens(p, param) for p in prompts]
        self.stops = StopStrings(body.stop_strings())
        self.stats = [ChoiceStats() for _ in range(len(prompts) * body.n)]
        self.handles: list[Any] = []

    def _max_tokens(self, prompt: list[int], param: str) -> int:
        """The completion budget of one prompt (tokens); refuses a request that cannot fit the context."""
        state, asked = self.state, self.body.max_tokens
        room = state.context_length - len(prompt)
        if asked is None:
            default = DEFAULT_COMPLETION_MAX_TOKENS if not self.chat else state.max_tokens_limit
            asked = min(default, state.max_tokens_limit, room)
            if asked >= 1:
                return asked
            asked = 1
        if len(prompt) + asked > state.context_length:
            raise ApiError(
                400,
                f"this model's maximum context length is {state.context_length} tokens, but {len(prompt) + asked} were "
                f"requested ({len(prompt)} in the {param}, {asked} for the completion); shorten the {param} or lower "
                "max_tokens.",
                param=param if room < 1 else "max_tokens", code="context_length_exceeded",
            )
        return asked

    def _submit(self) -> None:
        # The engine module imports torch: imported here, once the model is loaded, not before listening.
        from llmctl.serving.engine import EngineStopped, GenerationRequest, QueueFull

        body = self.body
        sequences = len(self.prompts) * body.n
        if sequences > self.engine.max_queue:  # it could never be queued, however idle the server
            raise ApiError(400, f"this request asks for {sequences} sequences ({len(self.prompts)} prompt(s) x n {body.n}) "
                           f"but this server queues at most {self.engine.max_queue}; lower n or send fewer prompts.",
                           param="n", code="too_many_sequences")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            for prompt, max_tokens in zip(self.prompts, self.max_tokens):
                for j in range(body.n):
                    request = GenerationRequest(
                        prompt_ids=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                        top_k=body.top_k, stop_ids=[] if body.ignore_eos else [self.state.eot_id],
                        seed=None if body.seed is None else (body.seed + j) % 2**63, logprobs=self.logprobs,
                    )
                    self.handles.append(self.engine.submit(request))
        except QueueFull:
            self._cancel()
            raise ApiError(503, "the server's queue is full; retry shortly.", type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)}) from None
        except EngineStopped:
            self._cancel()
            raise ApiError(503, "the server is shutting down.", type="server_error", code="shutting_down") from None
        except ValueError as e:  # the engine's own checks; the ones above should have caught it first
            self._cancel()
            raise ApiError(400, str(e)) from None
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in self.prompts))

    def _cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def respond(self, request: Request) -> Response:
        self._submit()
        if self.body.stream:
            return _EventStream(self._events(), on_close=self._cancel,
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await _unless_disconnected(request, self._collect())
        except EngineFailure as e:
            raise ApiError(500, f"generation failed: {e}", type="server_error") from None
        finally:
            self._cancel()
        if choices is None:  # the client went away: nobody reads an answer
            return Response(status_code=499)
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": choices, "usage": self._usage()}
        return JSONResponse(body)

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(s.completion_tokens for s in self.stats)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token_text(self, token_id: int) -> str:
        return self.state.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _choice(self, index: int) -> AsyncIterator[ChoicePiece]:
        """The pieces of one choice, its tokens counted in the metrics however it ends."""
        metrics = self.state.metrics
        try:
            async with aclosing(choice_pieces(
                self.handles[index], self.state.tokenizer, self.stops, started_at=self.arrived,
                stats=self.stats[index], keep_tokens=self.logprobs is not None,
                on_first_token=metrics.time_to_first_token.observe, on_next_token=metrics.time_per_output_token.observe,
            )) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            metrics.completion_tokens.inc(self.stats[index].completion_tokens)

    async def _pieces(self) -> AsyncIterator[tuple[int, ChoicePiece]]:
        """(choice index, piece) of every choice, as they come; several choices run one task each."""
        if len(self.handles) == 1:  # the common case, without a task and a queue between each token
            async with aclosing(self._choice(0)) as pieces:
                async for piece in pieces:
                    yield 0, piece
            self.state.metrics.request_latency.observe(time.perf_counter() - self.arrived)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with aclosing(self._choice(index)) as pieces:
                    async for piece in pieces:
                        queue.put_nowait((index, piece))
            except BaseException as e:  # handed to the reader, which re-raises it
                queue.put_nowait((index, e))
                if isinstance(e, asyncio.CancelledError):
                    raise

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(self.handles))]
        try:
            open_choices = len(tasks)
            while open_choices:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_choices -= 1
                yield index, item
            self.state.metrics.request_latency.observe(time.perf_counter() - self.arrived)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self) -> list[dict[str, Any]]:
        texts = [""] * len(self.handles)
        tokens: list[list[Any]] = [[] for _ in self.handles]
        finish: list[str | None] = [None] * len(self.handles)
        async with aclosing(self._pieces()) as pieces:
            async for index, piece in pieces:
                texts[index] += piece.text
                tokens[index] += piece.tokens
                finish[index] = piece.finish_reason or finish[index]
        choices = []
        for i, text in enumerate(texts):
            logprobs = None
            if self.logprobs is not None:
                logprobs = chat_logprobs(tokens[i], self._token_text) if self.chat else completion_logprobs(
                    tokens[i], self._token_text, 0)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": logprobs, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish[i]})
        return choices

    async def _events(self) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name}
        offsets = [0] * len(self.handles)
        if self.chat:  # the first chunk of each choice names the role, as OpenAI's do
            yield _sse({**head, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.handles))], **extra})
        # Every chunk shares all but its choice: render that part once (a chunk per token adds up).
        before = b"data: " + _json(head)[:-1] + b',"choices":['
        after = b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        held: dict[int, ChoicePiece] = {}  # text not sent yet: its stream sent an event too recently
        sent_at: dict[int, float] = {}
        self.state.open_streams += len(self.handles)
        try:
            async with aclosing(self._pieces()) as pieces:
                async for index, piece in pieces:
                    if index in held:
                        piece = held.pop(index).followed_by(piece)
                    if not (piece.text or piece.tokens or piece.finish_reason is not None):
                        continue
                    now = time.perf_counter()
                    interval = self.state.open_streams / STREAM_EVENTS_PER_S
                    if piece.finish_reason is None and now - sent_at.get(index, -1e9) < interval:
                        held[index] = piece
                        continue
                    sent_at[index] = now
                    yield before + _json(self._chunk_choice(index, piece, offsets)) + after
        except EngineFailure as e:
            yield _sse(error_body(f"generation failed: {e}", type="server_error"))
        finally:
            self.state.open_streams -= len(self.handles)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": self._usage()})
        yield b"data: [DONE]\n\n"

    def _chunk_choice(self, index: int, piece: ChoicePiece, offsets: list[int]) -> dict[str, Any]:
        """One choice of a stream chunk: the new text (a chat delta) and the logprobs of its tokens."""
        logprobs = None
        if self.logprobs is not None:
            logprobs = chat_logprobs(piece.tokens, self._token_text) if self.chat else completion_logprobs(
                piece.tokens, self._token_text, offsets[index])
        offsets[index] += len(piece.text)
        if self.chat:
            delta = {"content": piece.text} if piece.text else {}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": piece.finish_reason}
        return {"index": index, "text": piece.text, "logprobs": logprobs, "finish_reason": piece.finish_reason}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


class _EventStream(StreamingResponse):
    """A text/event-stream response that cancels its engine requests however it ends (finished,
    client gone, server cancelled)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(content, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, or give up (cancelling it, returning None) when the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


# --------------------------------------------------------------------------- auth, request counting, size cap


def _json_for_curl(scope: Any) -> Any:
    """`curl -d '{...}'` labels its JSON body application/x-www-form-urlencoded; read it as JSON, as
    OpenAI-compatible servers are used that way. Only without an Origin header: a browser always sends
    one on a cross-site POST, so a web page still cannot make a form post count as an API call."""
    if scope.get("method") != "POST" or not scope["path"].startswith("/v1/"):
        return scope
    headers = list(scope.get("headers") or [])
    names = {k for k, _ in headers}
    ctype = dict(headers).get(b"content-type", b"")
    if b"origin" in names or not (ctype == b"" or ctype.startswith(b"application/x-www-form-urlencoded")):
        return scope
    headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
    return {**scope, "headers": headers}


class _Gatekeeper:
    """ASGI middleware: counts every answer by endpoint and status, requires the API key on /v1/* (before
    any of the body is read), and caps the body at MAX_BODY_BYTES and MAX_BODY_SEPARATORS whatever its
    framing: a Content-Length over the cap is refused before reading, any other body as soon as what
    was read passes a cap."""

    def __init__(self, app: Any, state: ServingState):
        self.app, self.state = app, state
        self._expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        scope = _json_for_curl(scope)
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counting_send)
            else:
                capped = _CappedBody(receive, counting_send, MAX_BODY_BYTES, MAX_BODY_SEPARATORS)
                await self.app(scope, capped.receive, capped.send)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope: Any) -> Response | None:
        headers = dict(scope.get("headers") or [])
        if self._expected is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not given:
                return _error_response(401, "no API key given; send it as the header 'Authorization: Bearer KEY'.",
                                       "invalid_api_key")
            scheme, _, key = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(b"Bearer " + key.strip(), self._expected):
                return _error_response(401, "incorrect API key.", "invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _body_too_large(MAX_BODY_BYTES)
        return None


class _CappedBody:
    """The app's receive and send for one request, counting the body's bytes and JSON separators as the
    app reads them. Once either passes its cap, the client is answered 413 (the connection then closes,
    so the rest is never read) and the app is told the client went away; what it would still send is
    dropped."""

    def __init__(self, receive: Any, send: Any, max_bytes: int, max_separators: int):
        self._receive, self._send = receive, send
        self.max_bytes, self.max_separators = max_bytes, max_separators
        self.received = self.separators = 0
        self.refused = False
        self._started = False

    async def receive(self) -> dict:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            self.received += len(chunk)
            self.separators += chunk.count(b",") + chunk.count(b":")
            if self.received > self.max_bytes or self.separators > self.max_separators:
                await self._refuse()
                return {"type": "http.disconnect"}
        return message

    async def _refuse(self) -> None:
        self.refused = True
        if self._started:
            return
        if self.received > self.max_bytes:
            response = _body_too_large(self.max_bytes)
        else:
            response = JSONResponse(error_body(
                f"the body holds more than {self.max_separators:,} JSON values (commas and colons); no request this "
                "server takes needs that many: send fewer prompts per request.", code="body_too_large"),
                status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, self._receive, self._send)

    async def send(self, message: dict) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self._started = True
        await self._send(message)


def _body_too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse(error_body(f"the body is over {max_bytes / 2**20:g} MiB ({max_bytes:,} bytes); send less.",
                                   code="body_too_large"),
                        status_code=413, headers={"Connection": "close"})


def _error_response(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, code=code), status_code=status, headers={"WWW-Authenticate": "Bearer"})
