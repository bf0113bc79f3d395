"""The HTTP API as a FastAPI app: /health, /metrics and /v1/models for every model, and the routes of
the served model's task (`llmctl.tasks.<task>.serving.router`: OpenAI's completions and chat for a
language model, /v1/classify for a classifier), mounted only for that task. Another task's endpoint
is refused with a 400 that names the endpoints to use.

Every refusal is OpenAI's error object with a 4xx status (bad input), 401 (API key), or 503 (loading,
a full queue: with Retry-After). The middleware (middleware.py) checks the key, counts the answers and
caps the body before any route reads it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.serving.middleware import Gatekeeper
from llmctl.serving.protocol import ApiError, error_body, validation_error
from llmctl.serving.requests import check_model
from llmctl.serving.state import RETRY_AFTER_LOADING_S, ServingState
from llmctl.tasks import task_named, task_names

SHARED_ENDPOINTS = ("/v1/models", "/health", "/metrics")


def task_endpoints() -> dict[str, str]:
    """Every task's POST endpoints: path -> the task that answers it."""
    return {path: name for name in task_names() for path in task_named(name).serving.ENDPOINTS}


def create_app(state: ServingState) -> FastAPI:
    """The FastAPI app serving `state`'s model; its runner may arrive later (`state.engine`)."""
    serving = task_named(state.task).serving
    others = {path for path, name in task_endpoints().items() if name != state.task}
    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gatekeeper, metrics=state.metrics, api_key=state.api_key,
                       endpoints=(*serving.ENDPOINTS, *sorted(others), *SHARED_ENDPOINTS))
    _add_error_handlers(app, state, others)
    _add_shared_routes(app, state)
    app.include_router(serving.router(state))
    return app


def _add_error_handlers(app: FastAPI, state: ServingState, others: set[str]) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        method, path, status = request.method, request.url.path, exc.status_code
        if status == 404 and path in others:  # another task's endpoint: known, not this model's
            status = 400 if method == "POST" else 405
        if status == 400 and exc.status_code == 404:
            message, code = task_named(state.task).serving.wrong_endpoint(state, path), "wrong_endpoint"
        elif status == 404:
            message, code = f"no such endpoint: {method} {path}", "not_found"
        elif status == 405:
            message, code = f"{method} is not allowed on {path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(error_body(message, code=code), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: answer in OpenAI's shape; uvicorn logs the traceback, the server lives on.
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"), 500)


def _add_shared_routes(app: FastAPI, state: ServingState) -> None:
    serving = task_named(state.task).serving

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
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmctl",
                "max_model_len": state.context_length, **serving.model_card(state)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(state, model_id)
        return model_card()
