"""One /v1/completions or /v1/chat/completions request in flight: its prompts x n engine requests,
answered as one JSON body or as one stream of server-sent events (OpenAI's chunks, grouped when many
streams are open, ending with usage and `data: [DONE]`). A client that goes away cancels its engine
requests, so its batch slots are freed at the next decode step."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llmctl.serving.decoding import ChoicePiece, ChoiceStats, EngineFailure, StopStrings, choice_pieces
from llmctl.serving.protocol import ApiError, chat_logprobs, completion_logprobs, error_body
from llmctl.serving.requests import queued, unless_disconnected
from llmctl.serving.sse import EventStream, json_bytes, sse_event
from llmctl.serving.state import ServingState

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Server-sent events per second, all streams together, before a stream's tokens are grouped into fewer
# events: each event costs the event loop tens of microseconds (JSON, HTTP framing, a send) that the
# model's threads want too. A lone stream still gets each token as its own event; 16 streams get one
# at most every 8 ms each (bench_serve, 2 CPU cores: ~+10% tokens/s at 16 clients).
STREAM_EVENTS_PER_S = 2000


class GenerationJob:
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
        from llmctl.serving.engine import GenerationRequest

        body = self.body
        sequences = len(self.prompts) * body.n
        if sequences > self.engine.max_queue:  # it could never be queued, however idle the server
            raise ApiError(400, f"this request asks for {sequences} sequences ({len(self.prompts)} prompt(s) x n {body.n}) "
                           f"but this server queues at most {self.engine.max_queue}; lower n or send fewer prompts.",
                           param="n", code="too_many_sequences")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            with queued():
                for prompt, max_tokens in zip(self.prompts, self.max_tokens):
                    for j in range(body.n):
                        request = GenerationRequest(
                            prompt_ids=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                            top_k=body.top_k, stop_ids=[] if body.ignore_eos else [self.state.eot_id],
                            seed=None if body.seed is None else (body.seed + j) % 2**63, logprobs=self.logprobs,
                        )
                        self.handles.append(self.engine.submit(request))
        except ApiError:
            self._cancel()
            raise
        except ValueError as e:  # the engine's own checks; the route's should have caught it first
            self._cancel()
            raise ApiError(400, str(e)) from None
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in self.prompts))

    def _cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def respond(self, request: Request) -> Response:
        self._submit()
        if self.body.stream:
            return EventStream(self._events(), on_close=self._cancel,
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await unless_disconnected(request, self._collect())
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
            yield sse_event({**head, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.handles))], **extra})
        # Every chunk shares all but its choice: render that part once (a chunk per token adds up).
        before = b"data: " + json_bytes(head)[:-1] + b',"choices":['
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
                    yield before + json_bytes(self._chunk_choice(index, piece, offsets)) + after
        except EngineFailure as e:
            yield sse_event(error_body(f"generation failed: {e}", type="server_error"))
        finally:
            self.state.open_streams -= len(self.handles)
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": self._usage()})
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
