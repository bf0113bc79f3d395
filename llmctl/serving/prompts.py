"""Request text to token ids as OpenAI treats it: user text is plain text, and a text that cannot fit
the context is refused before it is tokenized.

- Plain text: a literal "<|endoftext|>" in a prompt or a message is encoded as the characters it is,
  never as the special token (a copy of the tokenizer with `encode_special_tokens` set). Special tokens
  come only from the chat template's own text: the template's output is encoded as `prepare` encodes
  it, except that the special-token strings the user wrote are encoded as plain text.
- Bounded: a token covers at most `longest token` characters of text, so a text of more than
  context x that many characters cannot fit, and is refused without tokenizing it. Tokenizing holds
  the GIL (tokenizers' `encode` does not release it), so running it in a thread alone would not keep
  a huge prompt from stalling the event loop.
"""

from __future__ import annotations

from typing import Any

from llmctl.data.special_text import SpecialTextMarkers, plain_text, special_strings
from llmctl.serving.protocol import ApiError

# A normalizer can shorten text before it is split into tokens: NFC/NFKC compose up to ~4 code points
# into one. The character bound allows for it when the tokenizer has a normalizer.
NORMALIZER_SHRINK = 4


class PromptEncoder:
    """Token ids of the text of requests for one tokenizer and context length (tokens)."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.plain = plain_text(tokenizer)  # special-token strings in the text are text
        self.specials = special_strings(tokenizer)
        self.context_length = context_length
        self.max_chars = max_chars(tokenizer, context_length)

    def text_ids(self, text: str, where: str) -> list[int]:
        """Ids of user text (a completion prompt), special-token strings included as plain text."""
        self._check_length(text, where)
        return self.plain.encode(text, add_special_tokens=False).ids

    def chat_ids(self, template: Any, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of the chat template's rendering of `messages` ({"role", "content"[, "name"]} dicts).

        Special-token strings inside the messages are swapped for placeholders while the template
        renders, so that only the template's own special tokens are encoded as such.
        """
        marker = SpecialTextMarkers(self.specials)
        pieces = marker.split(template.render([marker.hide_in_message(m) for m in messages]))
        self._check_length("".join(piece for piece, _ in pieces), "messages")
        ids: list[int] = []
        for piece, is_user_special in pieces:
            encoder = self.plain if is_user_special else self.tokenizer
            ids += encoder.encode(piece, add_special_tokens=False).ids
        return ids

    def _check_length(self, text: str, where: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise ApiError(
                400, f"{where}: {len(text):,} characters cannot fit this model's context of {self.context_length} "
                f"tokens (no token is longer than {self.max_chars // self.context_length} characters); shorten it.",
                param="prompt" if where.startswith("prompt") else "messages", code="context_length_exceeded",
            )


def max_chars(tokenizer: Any, context_length: int) -> int | None:
    """The most characters a text of `context_length` tokens can hold (None: no bound is known).

    A BPE token's string is at most as long as the text it covers (byte-level: one character per byte;
    metaspace: one per character), so the longest token string bounds it; other models (WordPiece's
    [UNK] stands for a whole word) give no bound.
    """
    from tokenizers.models import BPE

    if not isinstance(tokenizer.model, BPE):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab(with_added_tokens=True)), default=1)
    shrink = NORMALIZER_SHRINK if tokenizer.normalizer is not None else 1
    return context_length * longest * shrink

