"""Instruction data (`data.task: instruct`): chat templates, and JSONL conversations rendered with one
into token shards plus a mask of the tokens the model learns to answer with.

A source line is `{"messages": [{"role": ..., "content": ...}, ...]}` (the OpenAI / Hugging Face chat
format; roles system, user, assistant) or `{"prompt": ..., "response": ...}` (with an optional
"system"). Each conversation is rendered turn by turn: what an assistant turn adds after the prompt the
template builds for it (`add_generation_prompt`) is a response span, with whatever end-of-turn text the
template puts after it; everything else is prompt. Each span is tokenized on its own, so the prompt
tokens are exactly those serve's chat endpoint feeds the model, and the mask covers exactly the
response spans plus the end-of-text id after a conversation that ends with the assistant (where serve
stops generating).

The dataset dir holds the lm task's token shards (train.bin, val.bin: conversations end to end, each
followed by the end-of-text id, so eval and compress read them as they are) and, per split,
`<split>.mask.bin` (uint8, 1 where the token is a response token) and `<split>.starts.bin` (uint64, the
offset of each conversation's first token); meta.json records task instruct, the chat template used
(which training copies into the model dir's config.json, for serve) and the response token counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from llmctl import __version__
from llmctl.artifacts import FORMAT_VERSION, DatasetDir, read_json_artifact, staged_dir, write_json_atomic
from llmctl.errors import LlmctlError

# Bump when a change here would make the same inputs give different files.
INSTRUCT_VERSION = 1
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val")

Progress = Callable[[str, int, "int | None"], None]

# --- chat templates ----------------------------------------------------------------------------------

# For a model trained on plain text: role-prefixed turns and an open assistant turn to continue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template rejected them); the client's request is at fault."""


class ChatTemplate:
    """A compiled chat template in Hugging Face's style, always rendered in Jinja2's sandbox.

    It sees what Hugging Face passes its templates: `messages` (a list of {"role", "content"} dicts),
    `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception(message)` and the `tojson`
    filter, so templates written for HF models work unchanged. `source` says where it came from.
    """

    def __init__(self, template: str, *, source: str, eos_token: str = "", bos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(str(message))

        # trim_blocks / lstrip_blocks: the whitespace rules HF renders its templates with.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.text = template
        self.source = source
        self.is_default = template == DEFAULT_CHAT_TEMPLATE
        self._eos, self._bos = eos_token, bos_token
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise LlmctlError(f"{source}: not a valid Jinja2 chat template ({e}); fix or remove it.") from None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; raises ChatTemplateError when the template refuses them."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                eos_token=self._eos, bos_token=self._bos,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:  # undefined names, sandbox violations, errors inside the template
            raise ChatTemplateError(f"the chat template ({self.source}) cannot render these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template ({self.source}) cannot render these messages: {e}") from None

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_response) pieces, end to end.

        The response piece of an assistant turn is what rendering it adds after the prompt the
        template builds for it; this needs a template whose render of a conversation's beginning is a
        beginning of its render of the whole (true of the usual ones). Raises ChatTemplateError if not.
        """
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1], add_generation_prompt=False)
            for before, after, what in ((done, prompt, f"the prompt for turn {i + 1}"), (prompt, turn, f"turn {i + 1}")):
                if not after.startswith(before):
                    raise ChatTemplateError(
                        f"the chat template ({self.source}) renders {what} so that it does not continue the text "
                        "before it, so the response tokens cannot be told apart; use a template whose rendering "
                        "of a conversation's first turns is the start of its rendering of the whole"
                    )
            pieces += [(prompt[len(done):], False), (turn[len(prompt):], True)]
            done = turn
        whole = self.render(messages, add_generation_prompt=False)
        if not whole.startswith(done):
            raise ChatTemplateError(f"the chat template ({self.source}) renders the whole conversation so that it "
                                    "does not continue its turns")
        pieces.append((whole[len(done):], False))
        return [(text, response) for text, response in pieces if text]


def chat_template_beside(folder: Path) -> tuple[str, str] | None:
    """(template, where) of the chat template a model or tokenizer dir carries, if any: llmctl's
    config.json "chat_template", or Hugging Face's chat_template.jinja or tokenizer_config.json
    "chat_template" (a string, or a list of named templates of which "default" is taken)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            found = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(found, list):
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(found, str) and found.strip():
            return found, f"{path} chat_template"
    return None


def resolve_chat_template(chat_template: str | None, tokenizer: str | None, init_from: str | None) -> tuple[str, str]:
    """(template, where it came from): `data.chat_template`, else the one beside `data.tokenizer` (the
    model dir or Hugging Face dir it belongs to), else model.init_from's, else llmctl's default."""
    if chat_template:
        return chat_template, "data.chat_template"
    for folder in (Path(tokenizer).parent if tokenizer else None, Path(init_from) if init_from else None):
        if folder is not None and folder.is_dir():
            found = chat_template_beside(folder)
            if found:
                return found
    return DEFAULT_CHAT_TEMPLATE, "llmctl's default chat template"


# --- reading conversations -----------------------------------------------------------------------------


@dataclass
class Conversation:
    """One source line as chat messages; `where` is file:line, `form` "messages" or "prompt_response"."""

    where: str
    messages: list[dict[str, str]]
    form: str


_SHAPE_HINT = ('an instruct line is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", '
               '"content": ...}]} or {"prompt": ..., "response": ...}')


def _text(value: Any, what: str, where: str, replace: bool) -> str:
    if not isinstance(value, str):
        raise LlmctlError(f"{where}: {what} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise LlmctlError(f"{where}: {what} is empty; every turn needs text.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes can spell lone surrogates, which no tokenizer accepts
        if not replace:
            raise LlmctlError(f"{where}: {what} holds a lone surrogate escape (not valid Unicode); set "
                              "data.encoding_errors: replace to replace it.") from None
        value = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value


def conversation_of(obj: Any, where: str, *, replace: bool = False) -> Conversation:
    """Check one parsed JSONL line and turn it into chat messages; LlmctlError naming `where` if it is not one."""
    if not isinstance(obj, dict):
        raise LlmctlError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_SHAPE_HINT}.")
    if "messages" in obj:
        turns = obj["messages"]
        if not isinstance(turns, list) or not turns:
            raise LlmctlError(f"{where}: messages must be a non-empty list of {{role, content}} objects.")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise LlmctlError(f"{where}: messages[{i}] must be an object with role and content, got {type(turn).__name__}.")
            role = turn.get("role")
            if role not in ROLES:
                raise LlmctlError(f"{where}: messages[{i}].role is {role!r}; roles are {', '.join(ROLES)}.")
            messages.append({"role": role, "content": _text(turn.get("content"), f"messages[{i}].content", where, replace)})
        if not any(m["role"] == "assistant" for m in messages):
            raise LlmctlError(f"{where}: no assistant turn, so nothing to learn from; add the answer as "
                              '{"role": "assistant", "content": ...}.')
        return Conversation(where, messages, "messages")
    if "prompt" in obj or "response" in obj:
        missing = [k for k in ("prompt", "response") if k not in obj]
        if missing:
            raise LlmctlError(f"{where}: has {'response' if missing == ['prompt'] else 'prompt'} but no {missing[0]}; "
                              f"{_SHAPE_HINT}.")
        messages = []
        if obj.get("system") is not None:
            messages.append({"role": "system", "content": _text(obj["system"], "system", where, replace)})
        messages.append({"role": "user", "content": _text(obj["prompt"], "prompt", where, replace)})
        messages.append({"role": "assistant", "content": _text(obj["response"], "response", where, replace)})
        return Conversation(where, messages, "prompt_response")
    keys = ", ".join(map(str, obj)) or "none"
    raise LlmctlError(f"{where}: neither messages nor prompt/response (keys: {keys}); {_SHAPE_HINT}.")


def read_conversations(data: Any, stats: Any) -> list[Conversation]:
    """Every conversation of `data.sources` (JSONL files), in source order; stops once `data.max_bytes`
    bytes of message text are read (keeping whole conversations)."""
    from llmctl.data.sources import iter_decoded_lines, resolve_source_files

    replace = data.encoding_errors == "replace"
    found: list[Conversation] = []
    text_bytes = 0
    for path, fmt, _ in resolve_source_files(data):
        if fmt != "jsonl":
            raise LlmctlError(
                f"data.sources: {path} is read as {fmt}, but instruct data is JSONL ({_SHAPE_HINT}); name .jsonl "
                "files, or set the source's format: jsonl."
            )
        before = len(found)
        for lineno, line in iter_decoded_lines(path, str(path), replace=replace, stats=stats):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmctlError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); JSON Lines needs one "
                                  "object per line.") from None
            conversation = conversation_of(obj, where, replace=replace)
            size = sum(len(m["content"].encode("utf-8")) for m in conversation.messages)
            if data.max_bytes is not None and text_bytes + size > data.max_bytes and found:
                return found
            text_bytes += size
            found.append(conversation)
            stats.documents += 1
            stats.bytes += size
        if len(found) == before:
            raise LlmctlError(f"{path} holds no conversation: every line is blank (data.sources).")
    return found


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


def encode_conversations(tokenizer: Any, rendered: list[list[tuple[str, bool]]], eot: int, dtype: np.dtype,
                         chunk: int = 4096, on_encoded: Callable[[int], None] | None = None) -> EncodedSplit:
    """Tokenize each conversation piece by piece and append the end-of-text id (a response token when the
    conversation ends with a response), unless the template already ended it with that id."""
    from llmctl.data.shards import _encode_batch

    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    starts = np.zeros(len(rendered), dtype=np.uint64)
    offset = 0
    for first in range(0, len(rendered), chunk):
        group = rendered[first : first + chunk]
        texts = [text for pieces in group for text, _ in pieces]
        encodings = iter(_encode_batch(tokenizer, texts))
        for k, pieces in enumerate(group):
            conv_ids: list[int] = []
            conv_mask: list[int] = []
            for _, response in pieces:
                piece = next(encodings).ids
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
            on_encoded(sum(len(t.encode("utf-8")) for t in texts))
    join = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
    return EncodedSplit(join(ids, dtype), join(masks, np.uint8), starts)


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


class InstructionData:
    """An instruct dataset dir as prepare wrote it, its files checked against meta.json."""

    def __init__(self, path: str | Path):
        self.dir = DatasetDir(Path(path))
        self.meta = self.dir.read_meta()
        if self.meta.get("task", "lm") != "instruct":
            raise LlmctlError(
                f"{self.dir.path}: a {self.meta.get('task', 'lm')} dataset dir, not instruction data; prepare it "
                "from a recipe with data.task: instruct (and a data.dir of its own)."
            )
        try:
            self.vocab_size = int(self.meta["vocab_size"])
            self.dtype = np.dtype(self.meta["dtype"])
            self.eot_id = int(self.meta["eot_id"])
            self.chat_template = str(self.meta["chat_template"])
            self._splits = {name: dict(self.meta["splits"][name]) for name in SPLITS}
        except (KeyError, TypeError, ValueError) as e:
            raise LlmctlError(f"{self.dir.meta}: damaged ({e!r} missing or malformed); run `llmctl prepare --force`.") from None

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def tokenizer_path(self) -> Path:
        return self.dir.tokenizer

    def split(self, name: str) -> InstructionSplit:
        if name not in self._splits:
            raise LlmctlError(f"no split {name!r} in a dataset dir; the splits are {', '.join(SPLITS)}.")
        tokens, examples = int(self._splits[name]["tokens"]), int(self._splits[name]["examples"])
        arrays = []
        for path, dtype, count in zip(split_files(self.path, name), (self.dtype, np.uint8, np.uint64), (tokens, tokens, examples)):
            if not path.is_file():
                raise LlmctlError(f"{path}: missing; run `llmctl prepare --force` to rebuild the dataset dir.")
            if path.stat().st_size != count * np.dtype(dtype).itemsize:
                raise LlmctlError(f"{path}: {path.stat().st_size} bytes, but meta.json says {count} {np.dtype(dtype).name} "
                                  "values; the dataset dir is damaged, run `llmctl prepare --force`.")
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype))
        return InstructionSplit(*arrays)


# --- prepare -----------------------------------------------------------------------------------------------


def _current_meta(out: DatasetDir, fp: str) -> dict | None:
    """The dataset dir's meta.json when it has fingerprint `fp` and its files are whole, else None."""
    if not out.meta.is_file() or not out.tokenizer.is_file():
        return None
    try:
        meta = read_json_artifact(out.meta, "dataset dir")
        if meta.get("task") != "instruct" or meta.get("fingerprint") != fp:
            return None
        found = InstructionData(out.path)
        for name in SPLITS:
            found.split(name)  # refuses a file whose size disagrees with meta.json
    except (LlmctlError, KeyError, TypeError, ValueError, OSError):
        return None
    return meta


def _split_conversations(conversations: list[Conversation], seed: int, val_fraction: float) -> tuple[list[int], list[int], str]:
    """(train indices, val indices, how): by a hash of each line's file:line like lm documents, or, when
    that leaves a split empty, the last val_fraction of the conversations as val ("tail")."""
    from llmctl.data.prepare import document_split
    from llmctl.data.sources import Document

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


def _fingerprint(data: Any, inputs: list[dict], tokenizer_sha256: str | None, seed: int, template: str) -> str:
    from llmctl.data.prepare import fingerprint

    lm = fingerprint(data, inputs, tokenizer_sha256, seed)
    return hashlib.sha256(json.dumps([INSTRUCT_VERSION, lm, template]).encode("utf-8")).hexdigest()


def prepare_instructions(data: Any, out_dir: Path, *, seed: int, force: bool = False,
                         on_progress: Progress | None = None, init_from: str | None = None) -> Any:
    """Build the instruct dataset dir `out_dir` from `data` (a DataConfig), or keep it when current.

    The tokenizer is data.tokenizer, else model.init_from's tokenizer.json (`init_from`, when the caller
    knows it), else one trained on the rendered train conversations. Returns a data.prepare.PrepareResult.
    """
    from llmctl.data.prepare import PrepareResult, _refuse_changed_inputs, _refuse_unsafe_out_dir, unigram_perplexity
    from llmctl.data.sources import SkippedFiles, SourceStats, hash_file, resolve_source_files
    from llmctl.data.tokenizer import load_tokenizer, token_dtype, train_tokenizer

    out = DatasetDir(Path(out_dir))
    skipped = SkippedFiles()
    files = [p for p, _, _ in resolve_source_files(data, skipped)]
    _refuse_unsafe_out_dir(out, files, data.sources)
    inputs = [hash_file(p) for p in files]
    reused = Path(data.tokenizer) if data.tokenizer else None
    if reused is None and init_from and (Path(init_from) / "tokenizer.json").is_file():
        reused = Path(init_from) / "tokenizer.json"
    tokenizer_sha = None
    if reused is not None:
        load_tokenizer(reused)  # a clear error for a missing or broken file before anything else
        tokenizer_sha = hash_file(reused)["sha256"]
    template_text, template_source = resolve_chat_template(data.chat_template, str(reused) if reused else None, init_from)
    eos = data.special_tokens[0]
    template = ChatTemplate(template_text, source=template_source, eos_token=eos)
    fp = _fingerprint(data, inputs, tokenizer_sha, seed, template_text)
    if not force:
        current = _current_meta(out, fp)
        if current is not None:
            return PrepareResult(out.path, current, skipped=True)

    def report(stage: str, done: int, total: int | None) -> None:
        if on_progress is not None:
            on_progress(stage, done, total)

    stats = SourceStats()
    conversations = read_conversations(data, stats)
    _refuse_changed_inputs(inputs, stats.files)
    rendered = []
    for conversation in conversations:
        try:
            rendered.append(template.segments(conversation.messages))
        except ChatTemplateError as e:
            raise LlmctlError(f"{conversation.where}: {e}.") from None
    train_at, val_at, split_kind = _split_conversations(conversations, seed, data.val_fraction)

    with staged_dir(out.path, f"the dataset dir {out.path}") as stage:
        if reused is not None:
            tok = load_tokenizer(reused)
            if tok.token_to_id(eos) is None:
                raise LlmctlError(
                    f"tokenizer {str(reused)!r}: has no token {eos!r} (data.special_tokens[0], the end-of-text token); "
                    "list one the tokenizer has first in data.special_tokens."
                )
            shutil.copyfile(reused, stage / "tokenizer.json")
        else:
            texts = ["".join(text for text, _ in rendered[i]) for i in train_at]
            total = sum(len(t.encode("utf-8")) for t in texts)
            report("tokenizer", 0, total)
            tok = train_tokenizer(texts, data.vocab_size, data.min_frequency, data.special_tokens)
            report("tokenizer", total, total)
            tok.save(str(stage / "tokenizer.json"))
        eot = tok.token_to_id(eos)
        vocab_size = tok.get_vocab_size()
        dtype = token_dtype(vocab_size)
        total = sum(len(text.encode("utf-8")) for pieces in rendered for text, _ in pieces)
        encoded = 0

        def on_encoded(n: int) -> None:
            nonlocal encoded
            encoded += n
            report("encode", encoded, total)

        splits = {}
        forms = {"messages": 0, "prompt_response": 0}
        for c in conversations:
            forms[c.form] += 1
        for name, at in (("train", train_at), ("val", val_at)):
            part = encode_conversations(tok, [rendered[i] for i in at], eot, dtype, on_encoded=on_encoded)
            for path, array in zip(split_files(stage, name), (part.ids, part.mask, part.starts)):
                array.tofile(path)
            splits[name] = {
                "tokens": int(len(part.ids)),
                "examples": len(at),
                "response_tokens": part.response_tokens,
                "bytes": sum(len(text.encode("utf-8")) for i in at for text, _ in rendered[i]),
            }
        train_path, _, _ = split_files(stage, "train")
        val_path, _, _ = split_files(stage, "val")
        meta = {
            "task": "instruct",
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "eot_id": eot,
            "special_tokens": list(data.special_tokens),
            "chat_template": template_text,
            "chat_template_source": template_source,
            "splits": splits,
            "split": split_kind,
            "formats": forms,
            "sources": {
                "files": len(inputs),
                "bytes": sum(f["bytes"] for f in inputs),
                "text_bytes": stats.bytes,
                "documents": stats.documents,
                "sha256": hashlib.sha256("".join(f["sha256"] for f in inputs).encode()).hexdigest(),
                "replaced_chars": stats.replaced_chars,
                "skipped_files": skipped.to_dict(),
                "list": inputs,
            },
            "tokenizer": {"trained": reused is None, "source": str(reused) if reused else None, "sha256": tokenizer_sha},
            "fingerprint": fp,
            "data": data.model_dump(mode="json"),
            "seed": seed,
            "unigram": unigram_perplexity(train_path, val_path, dtype, vocab_size),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "llmctl_version": __version__,
        }
        write_json_atomic(stage / "meta.json", meta)
    return PrepareResult(out.path, {"format_version": FORMAT_VERSION, **meta}, skipped=False)


def iter_response_runs(ids: np.ndarray, mask: np.ndarray) -> Iterator[np.ndarray]:
    """The token ids of each maximal run of response tokens, in order (for reports and tests)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    for start, end in zip(edges[::2], edges[1::2]):
        yield np.asarray(ids[start:end])
