"""From an engine's token events to the text of one choice: incremental detokenization, stop strings
matched on the decoded text, and the logprobs of the tokens whose text was sent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable


class IncrementalDetokenizer:
    """Decode a growing list of token ids into text pieces, holding back a piece while it ends in an
    incomplete UTF-8 sequence (a byte-level BPE token can carry part of a character).

    Decoding a short window of recent tokens, not the whole list, keeps each step O(1) (vLLM's scheme).
    At most MAX_HELD tokens are held: a character has at most 4 bytes, so text still ending in U+FFFD
    after that many tokens holds bytes that are invalid, not incomplete (a model can emit any bytes),
    and waiting longer would only stall the stream.
    """

    MAX_HELD = 4

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens up to here have had their text returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; the new text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        held = len(self.ids) - self._read
        if len(after) > len(before) and (not after.endswith("\ufffd") or held >= self.MAX_HELD):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class StopStrings:
    """OpenAI's `stop`: generation ends before the first occurrence of any of these strings."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]

    def find(self, text: str, start: int) -> int | None:
        """Index of the earliest stop string in text[start:], or None."""
        if not self.stops:
            return None
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def held_back(self, text: str) -> int:
        """Length of the longest end of `text` that could still grow into a stop string: not sent yet."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


@dataclass
class TokenRecord:
    """One generated token: its id, its logprob and top alternatives (when asked for), where its text starts."""

    id: int
    logprob: float | None
    top: dict[int, float] | None
    offset: int


@dataclass
class ChoicePiece:
    """Text ready to send for one choice, the tokens behind it, and the finish reason on the last piece."""

    text: str
    tokens: list[TokenRecord] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def followed_by(self, later: "ChoicePiece") -> "ChoicePiece":
        """This piece and a later one of the same choice as one."""
        return ChoicePiece(self.text + later.text, self.tokens + later.tokens, later.finish_reason, later.error)


class EngineFailure(RuntimeError):
    """The engine ended a sequence with finish_reason "error"."""


@dataclass
class ChoiceStats:
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None


async def choice_pieces(
    handle: Any,
    tokenizer: Any,
    stops: StopStrings,
    *,
    started_at: float,
    stats: ChoiceStats,
    keep_tokens: bool = True,
    on_first_token: Callable[[float], None] | None = None,
    on_next_token: Callable[[float], None] | None = None,
) -> AsyncIterator[ChoicePiece]:
    """The pieces of one choice as its engine request produces tokens; the last has a finish_reason.

    A stop string cancels the engine request and truncates the text before it. Leaving early (the
    client went away) cancels the request too, freeing its batch slot. Without `keep_tokens` the
    pieces carry no TokenRecords (nobody asked for logprobs).
    """
    detok = IncrementalDetokenizer(tokenizer)
    text, sent = "", 0
    pending: list[TokenRecord] = []
    events = handle.events()
    finished = False
    try:
        async for ev in events:
            if ev.token_id is not None:
                now = time.perf_counter()
                stats.completion_tokens += 1
                if stats.first_token_at is None:
                    stats.first_token_at = now
                    if on_first_token:
                        on_first_token(now - started_at)
                elif on_next_token and stats.last_token_at is not None:
                    on_next_token(now - stats.last_token_at)
                stats.last_token_at = now
                if keep_tokens:
                    pending.append(TokenRecord(ev.token_id, ev.logprob, ev.top_logprobs, len(text)))
                text += detok.push(ev.token_id)
            if ev.finish_reason is not None:
                text += detok.flush()
            cut = stops.find(text, sent)
            if cut is not None:
                handle.cancel()
                finished = True
                yield ChoicePiece(text[sent:cut], [t for t in pending if t.offset < cut], "stop")
                return
            if ev.finish_reason is not None:
                finished = True
                if ev.finish_reason == "error":
                    raise EngineFailure(getattr(ev, "message", None) or "the generation engine failed")
                yield ChoicePiece(text[sent:], pending, ev.finish_reason)
                return
            safe = len(text) - stops.held_back(text[sent:]) if stops.stops else len(text)
            if safe > sent:
                released = pending
                if pending and pending[-1].offset >= safe:
                    released = [t for t in pending if t.offset < safe]
                pending = pending[len(released) :]
                yield ChoicePiece(text[sent:safe], released)
                sent = safe
        # The engine's stream ended without a finish reason: treat as the engine's failure.
        finished = True
        raise EngineFailure("the generation engine ended a sequence without a finish reason")
    finally:
        if not finished:
            handle.cancel()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
