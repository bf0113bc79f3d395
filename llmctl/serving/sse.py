"""Server-sent events as OpenAI streams them: `data: {json}\n\n` per event, compact UTF-8 JSON, and a
response that cancels the request's work however the stream ends."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that calls `on_close` (cancelling its engine requests) however it
    ends: finished, client gone, server cancelled."""

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
