"""User text is text: a literal "<|endoftext|>" in a document, a text to classify or a chat message is
encoded as the characters it is, never as the special token, as OpenAI treats user text.

Special tokens come only from what llmctl itself adds: the end-of-text id after each document and the
chat template's own text. `prepare` and `serve` both encode through this module, so a text gives the
same ids in a dataset dir and in a request.
"""

from __future__ import annotations

import re
import secrets
import weakref
from typing import Any

from tokenizers import Tokenizer

# One plain copy per tokenizer object: copying a tokenizer of 16k tokens takes ~0.1 s, too long per request.
_PLAIN: "weakref.WeakKeyDictionary[Tokenizer, Tokenizer]" = weakref.WeakKeyDictionary()


def plain_text(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that encodes special-token strings in its input as plain text (the
    tokenizer itself when it already does)."""
    if tokenizer.encode_special_tokens:
        return tokenizer
    plain = _PLAIN.get(tokenizer)
    if plain is None:
        plain = Tokenizer.from_str(tokenizer.to_str())
        plain.encode_special_tokens = True
        _PLAIN[tokenizer] = plain
    return plain


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[Any]:
    """The encodings of `texts` by `tokenizer` as it is, without the post-processor's tokens."""
    # encode_batch_fast skips computing character offsets we never use (tokenizers >= 0.21).
    fast = getattr(tokenizer, "encode_batch_fast", None)
    return (fast or tokenizer.encode_batch)(texts, add_special_tokens=False)


def encode_user_texts(tokenizer: Tokenizer, texts: list[str]) -> list[Any]:
    """The encodings of user `texts`, special-token strings in them encoded as plain text."""
    return encode_batch(plain_text(tokenizer), texts)


def special_strings(tokenizer: Tokenizer) -> list[str]:
    """The strings of the tokenizer's special tokens, longest first."""
    added = tokenizer.get_added_tokens_decoder().values()
    return sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True)


class SpecialTextMarkers:
    """Placeholders for the special-token strings in user text while a chat template renders it, so that
    only the template's own special tokens are encoded as such; unguessable, drawn anew per instance."""

    def __init__(self, specials: list[str]):
        self.specials = specials  # longest first, so that the regex prefers the longest match
        nonce = secrets.randbelow(10**12)  # digits and private-use characters: no template filter changes them
        self._mark_of = {special: f"\ue000{nonce}.{i}\ue001" for i, special in enumerate(specials)}
        self._find_special = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._find_mark = re.compile(f"\ue000{nonce}\\.(\\d+)\ue001")

    def hide_in_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """`message` with the special-token strings of its content and name replaced by placeholders."""
        return {k: self.hide(v) if k in ("content", "name") and isinstance(v, str) else v for k, v in message.items()}

    def hide(self, text: str) -> str:
        if self._find_special is None:
            return text
        return self._find_special.sub(lambda m: self._mark_of[m.group(0)], text)

    def split(self, rendered: str) -> list[tuple[str, bool]]:
        """The rendered text as (piece, is a special-token string the user wrote), the placeholders undone."""
        pieces: list[tuple[str, bool]] = []
        start = 0
        for m in self._find_mark.finditer(rendered):
            if m.start() > start:
                pieces.append((rendered[start : m.start()], False))
            pieces.append((self.specials[int(m.group(1))], True))
            start = m.end()
        if start < len(rendered) or not pieces:
            pieces.append((rendered[start:], False))
        return pieces
