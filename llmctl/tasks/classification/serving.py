"""A classifier behind `llmctl serve`: llmctl's POST /v1/classify, each text answered with its label and
every class's probability, over the classifier runner (llmctl.serving.classify)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from llmctl.errors import LlmctlError
from llmctl.serving.classify import ClassifierSpec
from llmctl.serving.model_info import ServedShape
from llmctl.serving.protocol import MAX_CLASSIFY_TEXTS, ApiError, ClassificationRequest, parse_request
from llmctl.serving.requests import check_request, queued, read_body, unless_disconnected
from llmctl.serving.state import ServingState

if TYPE_CHECKING:
    from llmctl.serving.model_info import ModelInfo
    from llmctl.serving.runner import Runner
    from llmctl.serving.server import ServeOptions

ENDPOINTS = ("/v1/classify",)  # POST routes this task answers
ROUTES = "POST /v1/classify, GET /v1/models"  # what the startup line says the server answers


# --------------------------------------------------------------------------- before listening


def describe(config: dict[str, Any], tokenizer: Any, where: str, what: str) -> ServedShape:
    """A classifier's contract from its config.json (`where`): labels, the tokens it reads per text, its pad id."""
    spec = ClassifierSpec.from_config(config, where)
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise LlmctlError(f"{where}: needs an integer vocab_size; the {what} is damaged.")
    return ServedShape(spec.max_len, vocab, spec.pad_id, spec)


def refuse_options(options: ServeOptions, info: ModelInfo) -> None:
    """A classifier has no decode batch and no max_tokens: refuse those flags rather than ignore them."""
    given = [flag for flag, value in (("--max-batch-size", options.max_batch_size),
                                      ("--max-tokens-limit", options.max_tokens_limit)) if value is not None]
    if given:
        raise LlmctlError(
            f"{', '.join(given)}: for language models; {options.path} is a classifier, which reads up to "
            f"{MAX_CLASSIFY_TEXTS} texts per forward (--max-queue bounds the requests waiting)."
        )


def state_fields(info: ModelInfo, options: ServeOptions) -> dict[str, Any]:
    return {"eot_id": info.eot_id, "classifier": info.spec}


def kind_note(info: ModelInfo) -> str:
    return f"a classifier: {', '.join(info.spec.labels)}; "


# --------------------------------------------------------------------------- once loaded


def start_runner(model: Any, state: ServingState, options: ServeOptions) -> tuple[Runner, str]:
    """The classifier's runner, started: one thread owns the model, a request's texts go in one forward."""
    from llmctl.serving.classify import ClassifierRunner

    runner = ClassifierRunner(model, max_texts=MAX_CLASSIFY_TEXTS, max_queue=options.max_queue,
                              on_forward=state.metrics.on_forward)
    runner.start()
    return runner, (f"labels {', '.join(state.classifier.labels)}, texts cut to {state.context_length} tokens, up to "
                    f"{MAX_CLASSIFY_TEXTS} texts per forward, queue {options.max_queue} requests")


# --------------------------------------------------------------------------- the route


def model_card(state: ServingState) -> dict[str, Any]:
    return {"task": "classification", "labels": list(state.classifier.labels)}


def wrong_endpoint(state: ServingState, endpoint: str) -> str:
    return (f"{state.model_name} is a classifier (labels {', '.join(state.classifier.labels)}), not a language model, "
            f"so {endpoint} is not served here; POST the texts to /v1/classify as " + '{"input": ["text", ...]}.')


def router(state: ServingState) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/classify")
    async def classify(request: Request) -> Response:
        arrived = time.perf_counter()
        raw = await read_body(request)
        if raw is None:  # the client went away, or the body passed the cap (answered 413)
            return Response(status_code=499)
        runner, texts, ids, lengths = await run_in_threadpool(_prepare, state, raw, request.headers.get("content-type"))
        return await _classify(state, runner, texts, ids, lengths, request, arrived)

    return routes


def _prepare(state: ServingState, raw: bytes, content_type: str | None) -> tuple[Any, list[str], Any, Any]:
    """A /v1/classify body's runner, texts, and their token ids and lengths (worker thread); ApiError if bad."""
    body = parse_request(raw, content_type, ClassificationRequest, before=_list_bound)
    runner = state.require_engine()
    check_request(state, body)
    texts = body.texts()
    try:
        ids, lengths = state.classifier.encode(state.prompts.plain, texts)
    except LlmctlError as e:  # a text the tokenizer reads as no tokens at all
        raise ApiError(400, f"input: {e.message}", param="input") from None
    return runner, texts, ids, lengths


def _list_bound(data: dict[str, Any]) -> None:
    """More texts than a request takes are refused before each is validated (millions would hold the GIL)."""
    texts = data.get("input")
    if isinstance(texts, list) and len(texts) > MAX_CLASSIFY_TEXTS:
        raise ApiError(400, f"input: at most {MAX_CLASSIFY_TEXTS} texts per request, got {len(texts):,}; send them "
                       "in several requests.", param="input")


async def _classify(state: ServingState, runner: Any, texts: list[str], ids: Any, lengths: Any, request: Request,
                    arrived: float) -> Response:
    """Queue encoded texts for the classifier's thread, answer labels and probabilities in input order."""
    with queued():
        future = runner.submit(ids, lengths)
    try:
        probs = await unless_disconnected(request, asyncio.wrap_future(future))
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
        "model": state.model_name, "data": state.classifier.results(probs),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
