"""The instruct task's dataset: JSONL conversations rendered with a chat template into token shards plus
a mask of the tokens the model learns to answer with.

Each conversation is rendered turn by turn: what an assistant turn adds after the prompt the template
builds for it (`add_generation_prompt`) is a response span, with whatever end-of-turn text the template
puts after it; everything else is prompt. Each span is tokenized on its own, so the prompt tokens are
exactly those serve's chat endpoint feeds the model, and the mask covers exactly the response spans plus
the end-of-text id after a conversation that ends with the assistant (where serve stops generating).
Special tokens come only from the template's own text: a special-token string inside a message is
encoded as plain text, as serve encodes it (data.special_text).

The dataset dir holds the lm task's token shards (train.bin, val.bin: conversations end to end, each
followed by the end-of-text id, so eval and compress read them as they are) and, per split,
`<split>.mask.bin` (uint8, 1 where the token is a response token) and `<split>.starts.bin` (uint64, the
offset of each conversation's first token); meta.json records the chat template used (which training
copies into the model dir's config.json, for serve) and the response token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tokenizers import Tokenizer

from llmctl.config.schema import DataConfig
from llmctl.data.chat_template import ChatTemplate, ChatTemplateError, resolve_chat_template
from llmctl.data.conversations import Conversation, read_conversations
from llmctl.data.dataset_builder import DatasetBuild, Progress, PrepareResult
from llmctl.data.dataset_reader import PreparedDataset, memmap_file
from llmctl.data.prepare_summary import describe_token_shards, token_shards_summary
from llmctl.data.shards import document_split, unigram_perplexity
from llmctl.data.sources import Document, SkippedFiles, SourceStats, resolve_source_files
from llmctl.data.special_text import SpecialTextMarkers, encode_batch, encode_user_texts, special_strings
from llmctl.data.tokenizer import token_dtype
from llmctl.errors import LlmctlError

# A rendered conversation: (text, is a response piece, is a special-token string a message holds).
Pieces = list[tuple[str, bool, bool]]

summary = token_shards_summary
describe = describe_token_shards


# --- the dataset dir --------------------------------------------------------------------------------------


def split_files(root: Path, split: str) -> tuple[Path, Path, Path]:
    """The (token ids, response mask, conversation starts) files of `split` in an instruct dataset dir."""
    root = Path(root)
    return root / f"{split}.bin", root / f"{split}.mask.bin", root / f"{split}.starts.bin"


@dataclass
class InstructionSplit:
    """One split as memory maps: token ids (N,), response mask (N,) uint8, and conversation starts (E,)."""

    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def ends(self) -> np.ndarray:
        """One past each conversation's last token, shape (E,)."""
        return np.append(self.starts[1:], len(self.tokens)).astype(np.int64)


class InstructionData(PreparedDataset):
    """An instruct dataset dir as prepare wrote it, its files checked against meta.json."""

    TASKS = ("instruct",)
    WRONG_TASK = ("{path}: a {task} dataset dir, not instruction data; prepare it from a recipe with "
                  "data.task: instruct (and a data.dir of its own).")

    def read_fields(self, meta: dict[str, Any]) -> None:
        self.dtype = np.dtype(meta["dtype"])
        self.eot_id = int(meta["eot_id"])
        self.chat_template = str(meta["chat_template"])

    def split(self, name: str) -> InstructionSplit:
        tokens, examples = self.count(name, "tokens"), self.count(name, "examples")
        ids, mask, starts = split_files(self.path, name)
        return InstructionSplit(memmap_file(ids, self.dtype, tokens), memmap_file(mask, np.uint8, tokens),
                                memmap_file(starts, np.uint64, examples))


def open_dataset(path: str | Path) -> InstructionData:
    """The instruct dataset dir at `path`."""
    return InstructionData(path)


# --- prepare -----------------------------------------------------------------------------------------------


def prepare(data: DataConfig, out_dir: Path, *, seed: int, force: bool = False, on_progress: Progress | None = None,
            init_from: str | None = None) -> PrepareResult:
    """Build the instruct dataset dir `out_dir` from `data`, or keep it when current.

    The tokenizer is data.tokenizer, else model.init_from's tokenizer.json (`init_from`, when the caller
    knows it), else one trained on the rendered train conversations; the chat template comes from
    resolve_chat_template.
    """
    skipped = SkippedFiles()
    files = [p for p, _, _ in resolve_source_files(data, skipped)]
    reused, reused_from = _reused_tokenizer(data, init_from)
    text, source = resolve_chat_template(data.chat_template, str(reused) if reused else None, init_from)
    template = ChatTemplate(text, source=source, eos_token=data.special_tokens[0])
    build = DatasetBuild("instruct", data, out_dir, seed=seed, inputs={"sources": files}, specs=data.sources,
                         skipped=skipped, tokenizer=reused, tokenizer_from=reused_from,
                         extra={"chat_template": template.text}, on_progress=on_progress)
    if not force and (kept := build.current(open_dataset)) is not None:
        return kept
    stats = SourceStats()
    conversations = read_conversations(data, stats)
    build.refuse_changed("sources", stats)
    tok = build.reused_tokenizer() if reused is not None else None
    markers = SpecialTextMarkers(special_strings(tok) if tok else sorted(set(data.special_tokens), key=len, reverse=True))
    rendered = [_render(template, markers, c) for c in conversations]
    train_at, val_at, split_kind = _split_conversations(conversations, seed, data.val_fraction)
    with build.staged() as stage:
        if tok is None:
            tok = build.train_on(["".join(text for text, _, _ in rendered[i]) for i in train_at])
        eot = build.save_tokenizer(stage, tok)
        dtype = token_dtype(tok.get_vocab_size())
        encoded = build.counter("encode", sum(len(text.encode("utf-8")) for pieces in rendered for text, _, _ in pieces))
        splits = {name: _write_split(stage, name, [rendered[i] for i in at], tok, eot, dtype, encoded)
                  for name, at in (("train", train_at), ("val", val_at))}
        return build.write_meta(stage, tok, {
            "dtype": dtype.name,
            "chat_template": template.text,
            "chat_template_source": template.source,
            "splits": splits,
            "split": split_kind,
            "formats": {form: sum(c.form == form for c in conversations) for form in ("messages", "prompt_response")},
            "sources": build.sources_record("sources", stats, text_bytes=stats.bytes, documents=stats.documents),
            "unigram": unigram_perplexity(split_files(stage, "train")[0], split_files(stage, "val")[0], dtype,
                                          tok.get_vocab_size()),
        })


def _reused_tokenizer(data: DataConfig, init_from: str | None) -> tuple[Path | None, str]:
    """(the tokenizer.json to reuse, where it comes from): data.tokenizer, else init_from's, else none."""
    if data.tokenizer:
        return Path(data.tokenizer), "data.tokenizer"
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return Path(init_from) / "tokenizer.json", "model.init_from's tokenizer"
    return None, "data.tokenizer"


def _render(template: ChatTemplate, markers: SpecialTextMarkers, conversation: Conversation) -> Pieces:
    """The conversation rendered as pieces, each special-token string of its messages a piece of its own."""
    try:
        segments = template.segments([markers.hide_in_message(m) for m in conversation.messages])
    except ChatTemplateError as e:
        raise LlmctlError(f"{conversation.where}: {e}.") from None
    return [(piece, response, special) for text, response in segments for piece, special in markers.split(text)]


def _split_conversations(conversations: list[Conversation], seed: int, val_fraction: float) -> tuple[list[int], list[int], str]:
    """(train indices, val indices, how): by a hash of each line's file:line like lm documents, or, when
    that leaves a split empty, the last val_fraction of the conversations as val ("tail")."""
    if len(conversations) < 2:
        raise LlmctlError(f"data.sources hold {len(conversations)} conversation(s); a train and a val split need at least 2.")
    split_of = document_split(seed, val_fraction)
    names = [split_of(Document(c.where, "", c.where)) for c in conversations]
    train = [i for i, n in enumerate(names) if n == "train"]
    val = [i for i, n in enumerate(names) if n == "val"]
    if train and val:
        return train, val, "examples"
    n_val = max(1, math.ceil(len(conversations) * val_fraction))
    order = list(range(len(conversations)))
    return order[:-n_val], order[-n_val:], "tail"


# --- encoding --------------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """A split's conversations end to end: token ids, the response mask (1 = response token) and the
    offset of each conversation's first token."""

    ids: np.ndarray
    mask: np.ndarray
    starts: np.ndarray

    @property
    def response_tokens(self) -> int:
        return int(self.mask.sum())


def _write_split(stage: Path, name: str, rendered: list[Pieces], tok: Tokenizer, eot: int, dtype: np.dtype,
                 on_encoded: Callable[[int], None]) -> dict[str, Any]:
    """Encode and write split `name`'s conversations; returns its meta.json record."""
    part = encode_conversations(tok, rendered, eot, dtype, on_encoded=on_encoded)
    for path, array in zip(split_files(stage, name), (part.ids, part.mask, part.starts)):
        array.tofile(path)
    return {
        "tokens": int(len(part.ids)),
        "examples": len(rendered),
        "response_tokens": part.response_tokens,
        "bytes": sum(len(text.encode("utf-8")) for pieces in rendered for text, _, _ in pieces),
    }


def encode_conversations(tokenizer: Tokenizer, rendered: list[Pieces], eot: int, dtype: np.dtype,
                         chunk: int = 4096, on_encoded: Callable[[int], None] | None = None) -> EncodedSplit:
    """Tokenize each conversation piece by piece and append the end-of-text id (a response token when the
    conversation ends with a response), unless the template already ended it with that id."""
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    starts = np.zeros(len(rendered), dtype=np.uint64)
    offset = 0
    for first in range(0, len(rendered), chunk):
        group = rendered[first : first + chunk]
        encodings = iter(_encode_pieces(tokenizer, [piece for pieces in group for piece in pieces]))
        for k, pieces in enumerate(group):
            conv_ids: list[int] = []
            conv_mask: list[int] = []
            for _, response, _ in pieces:
                piece = next(encodings)
                conv_ids += piece
                conv_mask += [int(response)] * len(piece)
            if not conv_ids or conv_ids[-1] != eot:
                conv_ids.append(eot)
                conv_mask.append(int(pieces[-1][1]) if pieces else 0)
            starts[first + k] = offset
            offset += len(conv_ids)
            ids.append(np.asarray(conv_ids, dtype=dtype))
            masks.append(np.asarray(conv_mask, dtype=np.uint8))
        if on_encoded is not None:
            on_encoded(sum(len(text.encode("utf-8")) for pieces in group for text, _, _ in pieces))
    join = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
    return EncodedSplit(join(ids, dtype), join(masks, np.uint8), starts)


def _encode_pieces(tokenizer: Tokenizer, pieces: Pieces) -> list[list[int]]:
    """The ids of each piece: the template's text as the tokenizer reads it, a message's special-token
    string as plain text."""
    plain = iter(encode_user_texts(tokenizer, [text for text, _, special in pieces if special]))
    template = iter(encode_batch(tokenizer, [text for text, _, special in pieces if not special]))
    return [next(plain if special else template).ids for _, _, special in pieces]


def iter_response_runs(ids: np.ndarray, mask: np.ndarray) -> Iterator[np.ndarray]:
    """The token ids of each maximal run of response tokens, in order (for reports and tests)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    for start, end in zip(edges[::2], edges[1::2]):
        yield np.asarray(ids[start:end])
