"""A language model behind `llmctl serve`: OpenAI's /v1/completions and /v1/chat/completions over the
generation engine (llmctl.serving.engine), streaming too.

A request's body is read on the event loop; parsing, checking and tokenizing it run in a worker thread,
on text already bounded by the context (llmctl.serving.prompts), so that one request never stalls the
others, their streams or /health. The request in flight is a `GenerationJob`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from llmctl.errors import LlmctlError
from llmctl.serving.generation_job import GenerationJob
from llmctl.serving.model_info import ServedShape
from llmctl.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request
from llmctl.serving.requests import check_request, read_body
from llmctl.serving.state import ServingState

if TYPE_CHECKING:
    from llmctl.serving.model_info import ModelInfo
    from llmctl.serving.runner import Runner
    from llmctl.serving.server import ServeOptions

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")  # POST routes this task answers
ROUTES = "OpenAI API under /v1"  # what the startup line says the server answers
DEFAULT_BATCH = 16  # sequences decoded together unless --max-batch-size says otherwise


# --------------------------------------------------------------------------- before listening


def describe(config: dict[str, Any], tokenizer: Any, where: str, what: str) -> ServedShape:
    """The context, vocabulary and end-of-text id of a language model's config.json (`where`)."""
    from llmctl.data.tokenizer import eot_id

    context, vocab = config.get("context_length"), config.get("vocab_size")
    if not isinstance(context, int) or context < 2 or not isinstance(vocab, int) or vocab < 1:
        raise LlmctlError(f"{where}: needs integer context_length and vocab_size; the {what} is damaged.")
    return ServedShape(context, vocab, eot_id(tokenizer))


def refuse_options(options: ServeOptions, info: ModelInfo) -> None:
    limit = options.max_tokens_limit
    if limit is not None and limit < 1:
        raise LlmctlError(f"--max-tokens-limit {limit}: must be at least 1.")


def state_fields(info: ModelInfo, options: ServeOptions) -> dict[str, Any]:
    """The ServingState fields of a language model: its end-of-text id, max_tokens bound and chat template."""
    from llmctl.serving.chat import chat_template_of

    eos = info.tokenizer.id_to_token(info.eot_id) or ""
    return {"eot_id": info.eot_id, "max_tokens_limit": options.max_tokens_limit or info.context_length,
            "chat_template": chat_template_of(info.config, str(info.config_path), eos)}


def kind_note(info: ModelInfo) -> str:
    """What the startup line says of the model before its backend (nothing: a language model is the default)."""
    return ""


# --------------------------------------------------------------------------- once loaded


def start_runner(model: Any, state: ServingState, options: ServeOptions) -> tuple[Runner, str]:
    """The generation engine over `model`, started, and what the ready line says of it."""
    from llmctl.serving.engine import Engine

    batch = options.max_batch_size or DEFAULT_BATCH
    engine = Engine(model, context_length=state.context_length, max_batch_size=batch, max_queue=options.max_queue,
                    on_step=state.metrics.on_step)
    engine.start()
    return engine, (f"context {state.context_length} tokens, max_tokens up to {state.max_tokens_limit}, batch "
                    f"{batch}, queue {options.max_queue}")


# --------------------------------------------------------------------------- the routes


def model_card(state: ServingState) -> dict[str, Any]:
    """What /v1/models adds for this task: nothing beyond OpenAI's fields."""
    return {}


def wrong_endpoint(state: ServingState, endpoint: str) -> str:
    """The 400's message for another task's endpoint."""
    return (f"{state.model_name} is a language model, not a classifier, so {endpoint} is not served here; use "
            "/v1/completions or /v1/chat/completions.")


def router(state: ServingState) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, _prepare_completion)

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, _prepare_chat)

    return routes


async def _generate(state: ServingState, request: Request, prepare: Callable[..., GenerationJob]) -> Response:
    """The body read on the event loop, parsed, checked and tokenized in a worker thread, then generated
    and answered on the event loop."""
    arrived = time.perf_counter()
    raw = await read_body(request)
    if raw is None:  # the client went away, or the body passed the cap (answered 413)
        return Response(status_code=499)
    job = await run_in_threadpool(prepare, state, raw, request.headers.get("content-type"), arrived)
    return await job.respond(request)


def _prepare_completion(state: ServingState, raw: bytes, content_type: str | None, arrived: float) -> GenerationJob:
    """A /v1/completions body as a job ready to submit (worker thread); ApiError for a bad request."""
    body = parse_request(raw, content_type, CompletionRequest, before=_list_bounds(state))
    engine = state.require_engine()
    _check(state, body)
    prompts = [_prompt_ids(state, p, where) for where, p in _prompt_list(body.prompt)]
    return GenerationJob(state, engine, body, prompts, chat=False, logprobs=body.logprobs, param="prompt",
                         arrived=arrived)


def _prepare_chat(state: ServingState, raw: bytes, content_type: str | None, arrived: float) -> GenerationJob:
    """A /v1/chat/completions body as a job ready to submit (worker thread); ApiError for a bad request."""
    from llmctl.serving.chat import ChatTemplateError

    body = parse_request(raw, content_type, ChatCompletionRequest, before=_list_bounds(state))
    engine = state.require_engine()
    _check(state, body)
    try:
        prompt = state.prompts.chat_ids(state.chat_template, [m.as_template_input() for m in body.messages])
    except ChatTemplateError as e:
        raise ApiError(400, str(e), param="messages") from None
    return GenerationJob(state, engine, body, [prompt or [state.eot_id]], chat=True, logprobs=body.engine_logprobs(),
                         param="messages", arrived=arrived)


def _check(state: ServingState, body: Any) -> None:
    check_request(state, body)
    if body.max_tokens is not None and body.max_tokens > state.max_tokens_limit:
        raise ApiError(400, f"max_tokens: at most {state.max_tokens_limit} on this server, got {body.max_tokens}.",
                       param="max_tokens", code="max_tokens_exceeded")


def _list_bounds(state: ServingState) -> Callable[[dict[str, Any]], None]:
    """A check of a parsed body that refuses a list too long for any request before each item is validated
    (for millions of items that alone would hold the GIL for seconds): a prompt or message list longer
    than the context (every prompt needs a token of it, every token id is one, a message renders to one
    at least)."""
    limit = state.context_length

    def refuse(data: dict[str, Any]) -> None:
        prompt, messages = data.get("prompt"), data.get("messages")
        if isinstance(prompt, list):
            longest = max([len(prompt)] + [len(p) for p in prompt[: limit + 1] if isinstance(p, list)])
            if longest > limit:
                raise ApiError(400, f"prompt: a list of {longest:,} items cannot fit this model's context of {limit} "
                               "tokens.", param="prompt", code="context_length_exceeded")
        if isinstance(messages, list) and len(messages) > limit:
            raise ApiError(400, f"messages: {len(messages):,} messages cannot fit this model's context of {limit} "
                           "tokens.", param="messages", code="context_length_exceeded")

    return refuse


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
