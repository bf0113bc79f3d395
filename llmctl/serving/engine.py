"""The generation engine behind `llmctl serve`: KV-cached decoding with continuous batching.

One background thread owns the model. Each loop turn is a token boundary: cancelled rows leave,
waiting requests are prefilled (alone, B = 1) and join the running batch, then one forward decodes
a token for every row at once (see batch.py for the cache layout). A short request therefore
never waits for a long one, and a request's tokens do not depend on what it is batched with: its
prefill is the very call `generate` makes, and each decode row sees only its own keys at its own
positions. The logits of a batched decode step still differ from a lone one's by ~1e-6, as the
matmul kernels sum in another order for 16 rows than for 1 (and softmax for another count of padding
keys), so the chosen tokens are the same unless two logits are that close. Models that quantize
activations with one scale per call (the "int8" scheme, ONNX int8 graphs) would let a request's tokens
depend on its neighbours; for them each row is decoded in a call of its own (batch.py), exactly as
`generate` would run it.

Works the same over the torch model (plain or quantized) and ONNX Runtime (OnnxCausalLM).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import torch

from llmctl.models.generation import SamplingParams, model_device, sample_next
from llmctl.serving.batch import KVCache, RunningBatch, prefill
from llmctl.serving.runner import QueueFull, Stopped

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One completion to generate: token ids in, up to `max_new_tokens` token ids out."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float | None = None
    top_k: int | None = None
    stop_ids: list[int] = field(default_factory=list)  # e.g. the end-of-text id; the stop token is not emitted
    seed: int | None = None  # reproducible sampling, whatever the request is batched with
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k as {token_id: logprob}


@dataclass
class TokenEvent:
    """One step of a request's output. Log-probabilities are the model's own (log_softmax of the raw
    logits, before temperature, top-k or top-p)."""

    token_id: int | None  # None only on a final event that carries no token
    logprob: float | None
    top_logprobs: dict[int, float] | None
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error"
    message: str | None = None  # what went wrong, on a final "error" event


class RequestHandle:
    """A submitted request: its events as they are generated, and a way to cancel it.

    Events are read once, by either `events()` (asyncio) or `events_sync()` (threads); a reader that
    stops before the final event (the client went away) cancels the request.
    """

    def __init__(self, engine: "Engine", request: GenerationRequest):
        self.request = request
        self._engine = engine
        self._lock = threading.Lock()
        self._buffer: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()  # until an async reader attaches
        self._sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent]] | None = None
        self._read = False
        self._finished = False
        self.cancel_requested = False

    @property
    def finished(self) -> bool:
        """Whether the final event has been sent."""
        return self._finished

    def cancel(self) -> None:
        """Stop generating: a waiting request ends at once, a running one at the next token boundary;
        either way a final "cancelled" event is sent. Does nothing once the request has finished."""
        if not self._finished:
            self.cancel_requested = True
            self._engine._cancel(self)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The request's events on the caller's event loop; ends after the one with a finish_reason."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._lock:
            self._claim_reader()
            while True:
                try:
                    events.put_nowait(self._buffer.get_nowait())
                except queue.Empty:
                    break
            self._sink = (loop, events)
        done = False
        try:
            while not done:
                event = await events.get()
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.cancel()

    def events_sync(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The request's events for a thread; waits at most `timeout` seconds for each (then TimeoutError)."""
        with self._lock:
            self._claim_reader()
        done = False
        try:
            while not done:
                try:
                    event = self._buffer.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no event from the engine within {timeout} s") from None
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.cancel()

    def _claim_reader(self) -> None:
        if self._read:
            raise RuntimeError("a request's events can be read only once")
        self._read = True

    def _emit(self, event: TokenEvent, outbox: "Outbox | None" = None) -> None:
        """Deliver one event (engine thread, or the canceller for a waiting request); nothing after the final one.

        With an `outbox`, an event for an asyncio reader waits there until the outbox is delivered.
        """
        with self._lock:
            if self._finished:
                return
            self._finished = event.finish_reason is not None
            sink = self._sink
            if sink is None:
                self._buffer.put(event)
                return
        loop, events = sink
        if outbox is not None:
            outbox.add(loop, self, events, event)
            return
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the reader's event loop is closed: nobody listens any more
            self.cancel_requested = True

    def _end(self, reason: str, message: str | None = None, outbox: "Outbox | None" = None) -> None:
        self._emit(TokenEvent(None, None, None, reason, message), outbox)


class Outbox:
    """The events of one engine step, handed to each reader's event loop in one call.

    Waking an event loop from another thread costs a write to its self-pipe and a turn of the loop;
    with 16 streams that is 16 wake-ups per token step instead of one.
    """

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, asyncio.Queue, TokenEvent]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, handle: RequestHandle, events: asyncio.Queue, event: TokenEvent) -> None:
        self._by_loop.setdefault(loop, []).append((handle, events, event))

    def deliver(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody listens any more
                for handle, _, _ in items:
                    handle.cancel_requested = True
        self._by_loop.clear()


def _put_all(items: list[tuple[RequestHandle, asyncio.Queue, TokenEvent]]) -> None:
    for _, events, event in items:
        events.put_nowait(event)


@dataclass
class _Row:
    """A request being decoded: its sampling state and how many tokens it has produced."""

    handle: RequestHandle
    params: SamplingParams
    generator: torch.Generator | None
    produced: int = 0


class Engine:
    """Continuous-batching generation over one model on a background thread.

    `context_length` (tokens) bounds prompt + max_new_tokens of every request; at most
    `max_batch_size` requests decode together and `max_queue` wait for a slot. `on_step(batch_size)`
    is called on the engine thread after each decode step (for metrics); it must be quick.
    """

    def __init__(
        self,
        model: Any,
        *,
        context_length: int,
        max_batch_size: int = 16,
        max_queue: int = 64,
        on_step: Callable[[int], None] | None = None,
    ):
        model_context = getattr(model, "context_length", None)
        if context_length < 1 or (model_context is not None and context_length > model_context):
            raise ValueError(
                f"context_length: must be between 1 and the model's {model_context} tokens, got {context_length}"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be 0 or more, got {max_queue}")
        model.eval()
        self.model = model
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.on_step = on_step
        self.vocab_size = _vocab_size(model)
        self._device = model_device(model)
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._batch_size = 0
        self._state = "new"  # -> running -> draining | aborting -> stopped
        self._thread: threading.Thread | None = None

    # --- the caller's side -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot, not yet in the batch."""
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        """Requests running now."""
        return self._batch_size

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the batching loop on a background thread."""
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"the engine was already started (it is {self._state})")
            self._state = "running"
            self._thread = threading.Thread(target=self._loop, name="llmctl-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more requests and end the engine thread.

        drain: finish the waiting and running requests first (for at most `timeout` seconds, after
        which the rest are cancelled); otherwise cancel them at the next token boundary.
        """
        with self._cond:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                self._cancel_waiting()
                return
            if self._state == "running":
                self._state = "draining" if drain else "aborting"
            elif not drain:
                self._state = "aborting"
            self._cond.notify_all()
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._state = "aborting"
                self._cond.notify_all()
            self._thread.join()

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(drain=False)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (from any thread). Raises ValueError for a bad request, QueueFull when
        `max_queue` requests already wait, Stopped once `stop` was called."""
        self._check(request)
        handle = RequestHandle(self, request)
        with self._cond:
            if self._state not in ("new", "running"):
                raise Stopped("the engine is stopping and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            if request.max_new_tokens == 0:
                handle._end("length")
                return handle
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def _check(self, r: GenerationRequest) -> None:
        """Refuse a request the loop could not run, naming the field to change."""
        prompt = len(r.prompt_ids) or 1  # an empty prompt starts from the first stop id, as `generate` does
        if r.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be 0 or more, got {r.max_new_tokens}")
        if prompt + r.max_new_tokens > self.context_length:
            raise ValueError(
                f"max_new_tokens: the prompt ({prompt} tokens) + max_new_tokens ({r.max_new_tokens}) exceed the "
                f"context length of {self.context_length} tokens"
            )
        if not r.temperature >= 0:
            raise ValueError(f"temperature: must be 0 (greedy) or more, got {r.temperature}")
        if r.top_p is not None and not 0 < r.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {r.top_p}")
        if r.top_k is not None and r.top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {r.top_k}")
        if r.logprobs is not None and not 0 <= r.logprobs <= (self.vocab_size or r.logprobs):
            raise ValueError(f"logprobs: must be between 0 and the vocabulary size {self.vocab_size}, got {r.logprobs}")
        if self.vocab_size is not None:
            bad = [t for t in r.prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_ids: token ids must be in [0, {self.vocab_size}), got {bad[:5]}")

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            try:
                self._waiting.remove(handle)
            except ValueError:  # running (ends at the next token boundary) or already finished
                self._cond.notify_all()
                return
        handle._end("cancelled")

    def _cancel_waiting(self) -> None:
        while self._waiting:
            self._waiting.popleft()._end("cancelled")

    # --- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        batch = RunningBatch(self.model, self._device, max_rows=self.max_batch_size, context_length=self.context_length)
        rows: list[_Row] = []  # in the batch's row order
        reason, message = "cancelled", None
        try:
            with torch.inference_mode():
                while True:
                    admitted = self._take_waiting(rows)
                    if admitted is None:
                        break
                    try:
                        self._drop_cancelled(batch, rows)
                        self._admit(admitted, batch, rows)
                        if rows:
                            self._decode(batch, rows)
                    except Exception as e:  # a bug in the loop: fail what it touched, keep serving the rest
                        log.exception("engine step failed")
                        for row in rows:
                            row.handle._end("error", _describe(e))
                        for handle in admitted:
                            handle._end("error", _describe(e))
                        batch.keep([])
                        rows.clear()
                    self._batch_size = len(rows)
        except BaseException as e:
            log.exception("engine thread failed")
            reason, message = "error", _describe(e)
            raise
        finally:
            for row in rows:
                row.handle._end(reason, message)
            with self._cond:
                self._state = "stopped"
                self._cancel_waiting()
            self._batch_size = 0

    def _take_waiting(self, rows: list[_Row]) -> list[RequestHandle] | None:
        """Wait for work; pop the waiting requests that fit in the batch. None: time to leave the loop."""
        with self._cond:
            while self._state == "running" and not self._waiting and not rows:
                self._cond.wait()
            if self._state == "aborting" or (self._state == "draining" and not self._waiting and not rows):
                return None
            free = self.max_batch_size - sum(not r.handle.cancel_requested for r in rows)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _drop_cancelled(self, batch: RunningBatch, rows: list[_Row]) -> None:
        keep = [i for i, row in enumerate(rows) if not row.handle.cancel_requested]
        if len(keep) < len(rows):
            for row in rows:
                if row.handle.cancel_requested:
                    row.handle._end("cancelled")
            batch.keep(keep)
            rows[:] = [rows[i] for i in keep]
            self._batch_size = len(rows)

    def _admit(self, admitted: list[RequestHandle], batch: RunningBatch, rows: list[_Row]) -> None:
        """Prefill each admitted request alone, emit its first token, and join the ones still going."""
        joining: list[tuple[KVCache, int]] = []
        while admitted:
            handle = admitted[0]
            if handle.cancel_requested:
                handle._end("cancelled")
                admitted.pop(0)
                continue
            r = handle.request
            row = _Row(handle, _sampling_params(r), None)
            if r.seed is not None:
                row.generator = torch.Generator(device=self._device).manual_seed(r.seed)
            try:
                prompt = list(r.prompt_ids) or [r.stop_ids[0] if r.stop_ids else 0]
                logits, cache = prefill(self.model, prompt, self._device)  # (1, V)
                next_id = self._choose(logits, [row])[0]
            except Exception as e:  # e.g. a backend refusing this prompt: only this request fails
                log.exception("prefill failed")
                handle._end("error", _describe(e))
                admitted.pop(0)
                continue
            admitted.pop(0)
            if next_id is not None:
                joining.append((cache, next_id))
                rows.append(row)
        batch.join(joining)
        self._batch_size = len(rows)

    def _decode(self, batch: RunningBatch, rows: list[_Row]) -> None:
        """One forward for the whole batch, then each row's next token; finished rows leave."""
        size = len(rows)
        try:
            logits = batch.step()  # (B, V)
        except Exception as e:  # the forward failed: every row in it is affected
            log.exception("decode step failed")
            for row in rows:
                row.handle._end("error", _describe(e))
            batch.keep([])
            rows.clear()
            return
        outbox = Outbox()
        try:
            chosen = self._choose(logits, rows, outbox)
        finally:  # a final event in the outbox has marked its request finished: it must reach the reader
            outbox.deliver()
        keep = [i for i, next_id in enumerate(chosen) if next_id is not None]
        for i in keep:
            batch.next_ids[i] = chosen[i]  # type: ignore[assignment]
        batch.keep(keep)
        rows[:] = [rows[i] for i in keep]
        self._batch_size = len(rows)
        if self.on_step is not None:
            try:
                self.on_step(size)
            except Exception:
                log.exception("on_step callback failed")

    def _choose(self, logits: torch.Tensor, rows: list[_Row], outbox: Outbox | None = None) -> list[int | None]:
        """Pick each row's next token from `logits` (B, V) and emit it (into `outbox` when given); None
        for a row that finished."""
        chosen: list[int] = logits.argmax(dim=-1).tolist()  # the greedy rows' answer, one sync for all
        failed: dict[int, str] = {}
        for i, row in enumerate(rows):
            if row.params.temperature > 0:
                try:
                    chosen[i] = int(sample_next(logits[i : i + 1], row.params, row.generator)[0])
                except Exception as e:  # e.g. NaN probabilities: this row only
                    failed[i] = _describe(e)
        logprobs = self._logprobs(logits, rows, chosen)
        out: list[int | None] = []
        for i, row in enumerate(rows):
            r = row.handle.request
            if i in failed:
                row.handle._end("error", failed[i], outbox)
                out.append(None)
            elif chosen[i] in r.stop_ids:
                row.handle._end("stop", None, outbox)
                out.append(None)
            else:
                row.produced += 1
                done = row.produced >= r.max_new_tokens
                lp, top = logprobs.get(i, (None, None))
                row.handle._emit(TokenEvent(chosen[i], lp, top, "length" if done else None), outbox)
                out.append(None if done else chosen[i])
        return out

    def _logprobs(
        self, logits: torch.Tensor, rows: list[_Row], chosen: list[int]
    ) -> dict[int, tuple[float, dict[int, float] | None]]:
        """The chosen token's logprob (and the top k) for the rows that asked, computed together."""
        asking = [i for i, row in enumerate(rows) if row.handle.request.logprobs is not None]
        if not asking:
            return {}
        index = torch.tensor(asking, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # (A, V)
        picked = lp.gather(1, torch.tensor([chosen[i] for i in asking], device=lp.device)[:, None])[:, 0].tolist()
        k = max(rows[i].handle.request.logprobs for i in asking)  # type: ignore[type-var]
        top_values, top_ids = (t.tolist() for t in lp.topk(k, dim=-1)) if k else ([], [])
        out: dict[int, tuple[float, dict[int, float] | None]] = {}
        for a, i in enumerate(asking):
            want = rows[i].handle.request.logprobs
            top = dict(zip(top_ids[a][:want], top_values[a][:want])) if want else None
            out[i] = (picked[a], top)
        return out


def _sampling_params(r: GenerationRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        stop_ids=list(r.stop_ids), seed=r.seed,
    )


def _vocab_size(model: Any) -> int | None:
    """The model's vocabulary size from its config (a GPTConfig or, for ONNX Runtime, a dict), if it says."""
    config = getattr(model, "config", None)
    size = config.get("vocab_size") if isinstance(config, dict) else getattr(config, "vocab_size", None)
    return int(size) if size is not None else None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
