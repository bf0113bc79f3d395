"""What every task's routes do with a request: read its body, check the model it names and the fields
it sets, hand it to the runner (a full queue or a stopping runner is one 503 each, written here once),
and give up on it when the client goes away."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Any, Awaitable, Iterator

from fastapi import Request
from starlette.requests import ClientDisconnect

from llmctl.serving.protocol import ApiError, Unsupported
from llmctl.serving.runner import QueueFull, Stopped
from llmctl.serving.state import ServingState

RETRY_AFTER_QUEUE_FULL_S = 1


async def read_body(request: Request) -> bytes | None:
    """The request's body (capped by the middleware), or None if the client went away or the cap refused it."""
    try:
        return await request.body()
    except ClientDisconnect:
        return None


def check_model(state: ServingState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {state.model_name!r}.",
                       param="model", code="model_not_found")


def check_request(state: ServingState, body: Any) -> None:
    """The body's model is this server's, and every field it sets is one llmctl honours."""
    check_model(state, body.model)
    try:
        body.check_supported()
    except Unsupported as e:
        raise ApiError(400, str(e), param=e.param) from None


@contextmanager
def queued() -> Iterator[None]:
    """Around a runner's `submit`: QueueFull and Stopped answered as 503s (the first with Retry-After)."""
    try:
        yield
    except QueueFull:
        raise ApiError(503, "the server's queue is full; retry shortly.", type="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)}) from None
    except Stopped:
        raise ApiError(503, "the server is shutting down.", type="server_error", code="shutting_down") from None


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
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
