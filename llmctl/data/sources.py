"""Reading documents out of the recipe's `data.sources`: text, JSONL and CSV files, globs, directories,
`builtin:stdlib` (the standard library's own `.py` files, a corpus every machine has) and
`builtin:sentiment` (the labelled sentences of llmctl/data/sentiment.csv, for classification).

Files are read in bounded pieces and hashed as they are read, so neither a huge file nor a huge corpus
is ever held in memory whole.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import os
import re
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from llmctl.config.schema import DataConfig, SourceSpec
from llmctl.errors import LlmctlError

STDLIB = "builtin:stdlib"
SENTIMENT = "builtin:sentiment"

# A text file is read in pieces of about this many bytes, cut at a line boundary.
PIECE_BYTES = 1 << 20

_GLOB_CHARS = set("*?[")
_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_REPLACE_HINT = "set data.encoding_errors: replace to replace such bytes"


@dataclass
class Document:
    """One document of the corpus; `continues` is True when the next document is the rest of the same file."""

    key: str
    text: str
    source: str
    continues: bool = False


@dataclass
class SkippedFiles:
    """What directory sources left out: binary files (a NUL byte in their first block, as git and grep
    judge), hidden files, and directories never entered (bytecode caches, version control, hidden ones)."""

    binary_files: int = 0
    hidden_files: int = 0
    dirs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"binary_files": self.binary_files, "hidden_files": self.hidden_files, "dirs": len(self.dirs),
                "dir_names": sorted(set(Path(d).name for d in self.dirs))}


@dataclass
class SourceStats:
    """What a pass over the sources read: files (path, bytes, sha256), documents, UTF-8 bytes of text
    yielded, and U+FFFD characters introduced by replacing undecodable bytes."""

    files: list[dict] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    replaced_chars: int = 0


# --- cutting text where the tokenizer would cut it anyway ---------------------------------------------

# The byte-level pre-tokenizer (GPT-2's regex) always ends a pre-token just before the last whitespace
# character of a whitespace run that is followed by a non-space ("a\n\n    def" splits as "a", "\n\n   ",
# " def"), and after a lone newline between non-spaces ("a\nb" splits as "a", "\n", "b"). Cutting text
# there changes no token, so the pieces encode to exactly the ids of the whole text. The whitespace at
# the cut is limited to ASCII, which the Rust and Python definitions of whitespace share.
_EXACT_CUT = re.compile(r"(?=[\t\n\r ]\S)|(?<=\S\n)(?=\S)")
_LINE_CUT = re.compile(r"(?<=\n)(?=[\t\n\r ]\S)|(?<=\S\n)(?=\S)")  # those right after a newline


def _last_match(pattern: re.Pattern, text: str, lo: int, hi: int) -> int | None:
    """Start of the last match of `pattern` in text[lo:hi], searching back from `hi` in growing windows."""
    width = 256
    while True:
        start = max(lo, hi - width)
        found = None
        for m in pattern.finditer(text, start, hi):
            found = m.start()
        if found is not None and found > 0:
            return found
        if start == lo:
            return None
        width *= 16


def text_cut(text: str, limit: int, lines: bool = False) -> int:
    """Where to end a first piece of `text` of at most `limit` characters (0 < cut <= limit).

    Prefers a cut that leaves tokenization unchanged (just after a newline too when `lines`), looking
    back over the last quarter of the window; else just after the last newline; else at `limit`.
    """
    if len(text) <= limit:
        return len(text)
    lo = max(1, limit - max(limit // 4, 1))
    # The pattern looks one character past the cut, so the search may see text[limit].
    for pattern in (_LINE_CUT, _EXACT_CUT) if lines else (_EXACT_CUT,):
        cut = _last_match(pattern, text, lo, limit + 1)
        if cut is not None:
            return cut
    newline = text.rfind("\n", 0, limit)
    return newline + 1 if newline >= 0 else limit


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """`text` in pieces of at most `max_chars` characters, cut where the tokenizer would cut anyway."""
    start = 0
    while len(text) - start > max_chars:
        cut = text_cut(text[start : start + max_chars + 1], max_chars)
        yield text[start : start + cut]
        start += cut
    yield text[start:]


# --- decoding that counts its replacements ---------------------------------------------------------

_counter = threading.local()
_COUNTING_REPLACE = "llmctl-count-replace"


def _count_and_replace(e: UnicodeError) -> tuple[str, int]:
    # The UTF-8 decoder calls this once per maximal invalid byte sequence, exactly where "replace"
    # would put one U+FFFD, so the output is identical and the calls are the count.
    if not isinstance(e, UnicodeDecodeError):
        raise e
    _counter.n = getattr(_counter, "n", 0) + 1
    return "\ufffd", e.end


codecs.register_error(_COUNTING_REPLACE, _count_and_replace)


class _InputFile:
    """An open input file that hashes every byte read and decodes UTF-8 reporting file byte offsets."""

    def __init__(self, path: Path, display: str, replace: bool, stats: SourceStats, hint: str = _REPLACE_HINT):
        self.path = path
        self.display = display
        self.replace = replace
        self.stats = stats
        self.hint = hint
        self.sha = hashlib.sha256()
        self.size = 0
        try:
            self.f: BinaryIO = open(path, "rb")
        except OSError as e:
            raise LlmctlError(f"{display}: cannot read ({e.strerror}).") from None
        self.decoder = codecs.getincrementaldecoder("utf-8")(
            errors=_COUNTING_REPLACE if replace else "strict"
        )

    def read(self, n: int) -> bytes:
        raw = self.f.read(n)
        self.sha.update(raw)
        self.size += len(raw)
        return raw

    def lines(self) -> Iterator[tuple[int, int, bytes]]:
        """(line number from 1, byte offset of the line, raw line) for each line of the file."""
        offset = 0
        for lineno, raw in enumerate(self.f, start=1):
            self.sha.update(raw)
            self.size += len(raw)
            yield lineno, offset, raw
            offset += len(raw)

    def decode(self, raw: bytes, offset: int, final: bool = False) -> str:
        """Decode `raw`, which starts at byte `offset` of the file, continuing any split character."""
        pending = len(self.decoder.getstate()[0])
        before = getattr(_counter, "n", 0)
        try:
            text = self.decoder.decode(raw, final)
        except UnicodeDecodeError as e:
            at = offset - pending + e.start
            raise LlmctlError(f"{self.display}: not UTF-8 at byte {at} ({self.hint}).") from None
        self.stats.replaced_chars += getattr(_counter, "n", 0) - before
        return text

    def decode_line(self, raw: bytes, lineno: int, offset: int) -> str:
        """Decode one whole line; a bad byte is reported with its line and file byte offset."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not self.replace:
                raise LlmctlError(
                    f"{self.display}:{lineno}: not UTF-8 at byte {offset + e.start} ({self.hint})."
                ) from None
        before = getattr(_counter, "n", 0)
        text = raw.decode("utf-8", _COUNTING_REPLACE)
        self.stats.replaced_chars += getattr(_counter, "n", 0) - before
        return text

    def finish(self) -> dict:
        """Hash whatever was left unread (reading stopped at max_bytes) and return the file's record."""
        while raw := self.f.read(1 << 20):
            self.sha.update(raw)
            self.size += len(raw)
        return {"path": self.display, "bytes": self.size, "sha256": self.sha.hexdigest()}

    def close(self) -> None:
        self.f.close()


# --- which files a source names ---------------------------------------------------------------------


def stdlib_root() -> Path:
    """The standard library folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk_files(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool],
                skipped: SkippedFiles | None = None) -> list[Path]:
    """Regular files below `root`, sorted, descending only into directories `keep_dir` accepts; what is
    left out is counted in `skipped`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if skipped is not None:
            skipped.dirs += [os.path.join(dirpath, d) for d in dirnames if not keep_dir(d)]
        dirnames[:] = sorted(d for d in dirnames if keep_dir(d))
        found.extend(Path(dirpath) / n for n in filenames if keep_file(n))
        if skipped is not None:
            skipped.hidden_files += sum(not keep_file(n) for n in filenames)
    return sorted(p for p in found if p.is_file())


# Never read from a directory source: bytecode caches and version-control metadata (.git, .hg and
# .svn are hidden, and every hidden name is skipped too).
_SKIPPED_DIRS = {"__pycache__", "CVS", "RCS", "SCCS", "_darcs"}
# A file with a NUL byte in its first block is binary (git's and grep's test).
_SNIFF_BYTES = 8192


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(_SNIFF_BYTES)
    except OSError:
        return False  # reading it later reports the problem with its name


def _stdlib_files() -> list[Path]:
    # site-packages can live inside the stdlib folder: third-party code is not the stdlib.
    return _walk_files(stdlib_root(), lambda d: d not in ("site-packages", "__pycache__"), lambda n: n.endswith(".py"))


def _dir_files(root: Path, skipped: SkippedFiles | None = None) -> list[Path]:
    """The text files below a directory source: hidden names, bytecode caches, version control and binary
    files (such as .pyc, images, archives) are left out, and counted in `skipped`."""
    files = _walk_files(root, lambda d: not d.startswith(".") and d not in _SKIPPED_DIRS,
                        lambda n: not n.startswith("."), skipped)
    text = [p for p in files if not _is_binary(p)]
    if skipped is not None:
        skipped.binary_files += len(files) - len(text)
    return text


def _format_of(spec: SourceSpec, path: Path) -> str:
    if spec.format != "auto":
        return spec.format
    return _FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text")


def sentiment_path() -> Path:
    """The packaged CSV behind builtin:sentiment (made by `python -m llmctl.data.sentiment`)."""
    return Path(__file__).with_name("sentiment.csv")


def _expand(spec: SourceSpec, index: int, key: str = "data.sources",
            skipped: SkippedFiles | None = None) -> tuple[str, list[Path]]:
    """(kind, files) for one source: kind is "stdlib", "sentiment", "file", "dir" or "glob"."""
    where = f"{key}[{index}] {spec.path!r}"
    if spec.path == STDLIB:
        files = _stdlib_files()
        if not files:
            raise LlmctlError(f"{where}: found no .py files under {stdlib_root()}.")
        return "stdlib", files
    if spec.path == SENTIMENT:
        if not sentiment_path().is_file():
            raise LlmctlError(f"{where}: {sentiment_path()} is missing; this llmctl install is incomplete, reinstall it.")
        return "sentiment", [sentiment_path()]
    if spec.path.startswith("builtin:"):
        raise LlmctlError(
            f"{where}: unknown built-in corpus; the built-ins are {STDLIB} (Python's standard library, for "
            f"language modelling) and {SENTIMENT} (labelled sentences, for classification)."
        )
    if _GLOB_CHARS & set(spec.path):
        files = sorted(Path(p) for p in glob.glob(spec.path, recursive=True) if os.path.isfile(p))
        if not files:
            raise LlmctlError(f"{where}: the glob matches no files (relative to {Path.cwd()}).")
        return "glob", files
    path = Path(spec.path)
    if path.is_dir():
        files = _dir_files(path, skipped)
        if not files:
            raise LlmctlError(f"{where}: the directory holds no text files (hidden names, __pycache__, version "
                              "control and binary files are skipped).")
        return "dir", files
    if path.is_file():
        return "file", [path]
    raise LlmctlError(f"{where}: no such file or directory (relative to {Path.cwd()}).")


_BUILTIN_FORMAT = {"stdlib": "text", "sentiment": "csv"}


def _resolve_specs(specs: list[SourceSpec], key: str = "data.sources",
                   skipped: SkippedFiles | None = None) -> list[tuple[int, str, list[tuple[Path, str]]]]:
    resolved = []
    for i, spec in enumerate(specs):
        kind, files = _expand(spec, i, key, skipped)
        fmt = _BUILTIN_FORMAT.get(kind)
        resolved.append((i, kind, [(p, fmt or _format_of(spec, p)) for p in files]))
    return resolved


def _resolve(data: DataConfig) -> list[tuple[int, str, list[tuple[Path, str]]]]:
    return _resolve_specs(data.sources)


def resolve_source_files(data: DataConfig, skipped: SkippedFiles | None = None) -> list[tuple[Path, str, SourceSpec]]:
    """Every input file in reading order as (path, format text|jsonl|csv, its source spec); what
    directory sources leave out is counted in `skipped`.

    Raises LlmctlError naming the source when a path, glob or directory gives no files.
    """
    return [
        (path, fmt, data.sources[i]) for i, _kind, files in _resolve_specs(data.sources, skipped=skipped)
        for path, fmt in files
    ]


def resolve_specs(specs: list[SourceSpec], key: str = "data.sources",
                  skipped: SkippedFiles | None = None) -> list[tuple[Path, str, int]]:
    """Every file of `specs` in reading order as (path, format text|jsonl|csv, index of its spec).

    `key` names the list in error messages (data.sources, data.val_sources); what directory sources
    leave out is counted in `skipped`.
    """
    return [(path, fmt, i) for i, _kind, files in _resolve_specs(specs, key, skipped) for path, fmt in files]


def hash_file(path: Path) -> dict:
    """{"path", "bytes", "sha256"} of a file, read in 1 MB blocks."""
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
                size += len(block)
    except OSError as e:
        raise LlmctlError(f"{path}: cannot read ({e.strerror}).") from None
    return {"path": str(path), "bytes": size, "sha256": sha.hexdigest()}


# --- readers, one per format ------------------------------------------------------------------------


def iter_decoded_lines(path: Path, display: str, *, replace: bool, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """(line number from 1, line with its newline) of a UTF-8 file, read line by line, a leading BOM dropped.

    A byte that is not UTF-8 is an LlmctlError naming the line and file byte offset, unless `replace`
    (then counted in `stats.replaced_chars`). Once read to the end, the file's {"path", "bytes",
    "sha256"} record is appended to `stats.files`.
    """
    src = _InputFile(path, display, replace, stats)
    try:
        for lineno, offset, raw in src.lines():
            line = src.decode_line(raw, lineno, offset)
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line
        stats.files.append(src.finish())
    finally:
        src.close()


def _text_documents(src: _InputFile, key: str) -> Iterator[Document]:
    """A text file as one document, or as pieces of about PIECE_BYTES when it is larger, cut at a line
    boundary where that changes no token (see text_cut)."""
    pieced = os.fstat(src.f.fileno()).st_size > PIECE_BYTES
    carry = ""
    pending: str | None = None
    k = 0
    offset = 0
    first = True
    while True:
        # Read less when a long unfinished line is carried over, so a piece stays near PIECE_BYTES.
        want = max(PIECE_BYTES - len(carry), PIECE_BYTES // 8)
        raw = src.read(want)
        eof = len(raw) < want  # a regular file gives fewer bytes than asked only at its end
        text = carry + src.decode(raw, offset, final=eof)
        offset += len(raw)
        if first:
            text = text.removeprefix("\ufeff")
            first = False
        if not eof and len(text) > 1:
            cut = text_cut(text, len(text) - 1, lines=True)
            piece, carry = text[:cut], text[cut:]
        else:
            piece, carry = text, ""
        if piece:
            if pending is not None:
                yield Document(f"{key}#{k}", pending, src.display, continues=True)
                k += 1
            pending = piece
        if eof:
            break
    if pending is not None:
        yield Document(f"{key}#{k}" if pieced or k else key, pending, src.display)


def _jsonl_documents(src: _InputFile, key: str, text_field: str) -> Iterator[Document]:
    for lineno, offset, raw in src.lines():
        line = src.decode_line(raw, lineno, offset)
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmctlError(
                f"{src.display}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                "JSON Lines needs one object per line."
            ) from None
        if not isinstance(obj, dict):
            raise LlmctlError(
                f"{src.display}:{lineno}: expected a JSON object with a string field {text_field!r}, "
                f"got {type(obj).__name__}."
            )
        text = obj.get(text_field)
        if not isinstance(text, str):
            keys = ", ".join(map(str, obj)) or "none"
            raise LlmctlError(
                f"{src.display}:{lineno}: no string field {text_field!r} (keys: {keys}); "
                "set the source's field: to the key that holds the text."
            )
        if text:
            yield Document(f"{key}:{lineno}", _valid_unicode(text, src, lineno), src.display)


def _valid_unicode(text: str, src: _InputFile, lineno: int) -> str:
    # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 encoder accepts.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if not src.replace:
            raise LlmctlError(
                f"{src.display}:{lineno}: the text holds a lone surrogate escape (not valid Unicode) "
                f"({_REPLACE_HINT})."
            ) from None
    fixed = []
    for ch in text:
        if "\ud800" <= ch <= "\udfff":
            fixed.append("\ufffd")
            src.stats.replaced_chars += 1
        else:
            fixed.append(ch)
    return "".join(fixed)


_QUOTING_HINT = 'a field holding a comma or a line break must be quoted, e.g. "good, not great"'


def csv_rows(lines: Iterable[str], display: str) -> Iterator[tuple[int, list[str]]]:
    """(line number from 1, fields) of every row of a CSV file, the header row first, blank lines skipped.

    Strict: a row whose field count is not the header's, a quote never closed (which would make the
    rest of the file one field) and any other malformed quoting are LlmctlErrors naming the physical
    line: the row's first line (a quoted field may span several), or the line a quoting error is on.
    """
    old_limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # the default (128 KB) is far below a long document
    try:
        reader = csv.reader(lines, strict=True)  # reader.line_num counts the physical lines read
        header: list[str] | None = None
        line_before = 0
        try:
            for row in reader:
                line = line_before + 1  # the row's first line
                line_before = reader.line_num
                if not row:
                    continue
                if header is None:
                    header = row
                elif len(row) != len(header):
                    raise LlmctlError(
                        f"{display}:{line}: {len(row)} field(s) where the header has {len(header)} "
                        f"({', '.join(name.strip() for name in header)}); {_QUOTING_HINT}."
                    )
                yield line, row
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise LlmctlError(
                    f"{display}:{line_before + 1}: a quote opened on this line is never closed, so the rest of the file "
                    'would be one field; close it (a quote inside a quoted field is written twice: "").'
                ) from None
            raise LlmctlError(f"{display}:{reader.line_num}: not valid CSV ({e}); {_QUOTING_HINT}.") from None
    finally:
        csv.field_size_limit(old_limit)


def _csv_documents(src: _InputFile, key: str, column: str) -> Iterator[Document]:
    def text_lines() -> Iterator[str]:
        for lineno, offset, raw in src.lines():
            line = src.decode_line(raw, lineno, offset)
            yield line.removeprefix("\ufeff") if lineno == 1 else line

    rows = csv_rows(text_lines(), src.display)
    first = next(rows, None)
    if first is None:
        return
    header = [name.strip() for name in first[1]]
    if column not in header:
        raise LlmctlError(
            f"{src.display}: no column {column!r} (columns: {', '.join(header) or 'none'}); "
            "set the source's field: to the column that holds the text."
        )
    if header.count(column) > 1:
        raise LlmctlError(f"{src.display}:1: the column {column!r} is named twice; rename one of them.")
    at = header.index(column)
    for line, row in rows:
        if row[at]:
            yield Document(f"{key}:{line}", row[at], src.display)


def _documents_of(src: _InputFile, fmt: str, key: str, spec: SourceSpec) -> Iterator[Document]:
    if fmt == "jsonl":
        return _jsonl_documents(src, key, spec.field)
    if fmt == "csv":
        return _csv_documents(src, key, spec.field)
    return _text_documents(src, key)


def _glob_hint(source: str, kind: str) -> str:
    """What to do about bytes that are not UTF-8; for a file a directory or glob picked, also how to
    pick only the text files."""
    if kind == "dir":
        return f'{_REPLACE_HINT}, or read only the text files with a glob, e.g. data.sources=["{source.rstrip("/")}/**/*.py"]'
    if kind == "glob":
        return f'{_REPLACE_HINT}, or narrow the glob to the text files, e.g. **/*.py'
    return _REPLACE_HINT


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _truncate_utf8(text: str, n: int) -> str:
    return text.encode("utf-8")[:n].decode("utf-8", "ignore")


def iter_documents(data: DataConfig, stats: SourceStats) -> Iterator[Document]:
    """Every document of `data.sources`, in source order and sorted file order, deterministically.

    Fills `stats` as it goes and stops once `data.max_bytes` bytes of UTF-8 text have been yielded,
    cutting the last document short.
    """
    remaining = data.max_bytes
    root = stdlib_root()
    for index, kind, files in _resolve(data):
        spec = data.sources[index]
        hint = _glob_hint(spec.path, kind)
        source_had_text = False
        for path, fmt in files:
            replace = kind == "stdlib" or data.encoding_errors == "replace"
            if kind == "stdlib":
                display, key = str(path), "stdlib/" + path.relative_to(root).as_posix()
            else:
                display = key = str(path)
            src = _InputFile(path, display, replace, stats, hint)
            stop = False
            file_had_text = False
            try:
                for doc in _documents_of(src, fmt, key, spec):
                    n = _utf8_len(doc.text)
                    if remaining is not None and n >= remaining:
                        doc.text = _truncate_utf8(doc.text, remaining) if n > remaining else doc.text
                        doc.continues = False
                        n = _utf8_len(doc.text)
                        stop = True
                    if doc.text:
                        file_had_text = True
                        stats.bytes += n
                        stats.documents += 0 if doc.continues else 1
                        yield doc
                    if remaining is not None:
                        remaining -= n
                    if stop:
                        break
                stats.files.append(src.finish())
            finally:
                src.close()
            if stop:
                return
            source_had_text = source_had_text or file_had_text
            if not file_had_text and kind == "file":
                raise LlmctlError(f"{display} is empty: it holds no text (data.sources[{index}]).")
        if not source_had_text:
            raise LlmctlError(f"data.sources[{index}] {spec.path!r} is empty: its {len(files)} file(s) hold no text.")
