"""The ASGI middleware in front of every route: the API key on /v1/* (checked before any of the body is
read), every answer counted by endpoint and status, and the body capped at MAX_BODY_BYTES and
MAX_BODY_SEPARATORS whatever its framing (413 past either)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse, Response

from llmctl.serving.protocol import error_body

MAX_BODY_BYTES = 16 * 2**20
# Commas and colons in a body: a bound on its JSON values. Parsing and validating holds the GIL, ~1 s for
# the ~8M values 16 MiB can spell ("[1,1,...]", 2 cores), stalling the event loop from any thread; at
# this bound it is ~0.1 s. No request that fits a context needs so many (token ids: one per token).
MAX_BODY_SEPARATORS = 2**19


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


class Gatekeeper:
    """ASGI middleware: counts every answer in `metrics` by endpoint (one of `endpoints`, else "other":
    never the raw path, which is unbounded) and status, requires `api_key` on /v1/* (before any of the
    body is read), and caps the body at MAX_BODY_BYTES and MAX_BODY_SEPARATORS whatever its framing: a
    Content-Length over the cap is refused before reading, any other body as soon as what was read
    passes a cap."""

    def __init__(self, app: Any, *, metrics: Any, api_key: str | None, endpoints: tuple[str, ...]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.endpoints else ("/v1/models" if path.startswith("/v1/models/") else "other")
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
            self.metrics.requests.labels(endpoint, str(status[0])).inc()

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
