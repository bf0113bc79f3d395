"""The skeleton of every task's `prepare`, written once: resolve and hash the inputs, fingerprint all that
decides the files, keep a dataset dir that is already current, stage a new one beside it, take or train
the tokenizer, write meta.json, and replace the dir atomically.

A task's data module (`llmctl.tasks.<task>.data`) supplies what differs: which files it reads, how it
reads, splits and encodes them, and what its meta.json adds. A failure at any point leaves no
half-written dataset and the previous good one untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from tokenizers import Tokenizer

from llmctl import __version__
from llmctl.artifacts import FORMAT_VERSION, DatasetDir, read_json_artifact, staged_dir, write_json_atomic
from llmctl.config.schema import DataConfig, SourceSpec
from llmctl.data.dataset_reader import SPLITS
from llmctl.data.sources import SkippedFiles, SourceStats, hash_file
from llmctl.data.tokenizer import eot_id, load_tokenizer, train_tokenizer
from llmctl.errors import EXIT_FAILURE, LlmctlError

# Bump when a change here would make the same inputs give different files, for every task.
# 2: user text is encoded as plain text (data.special_text); meta.json records `task` for lm too.
PREPARE_VERSION = 2

Progress = Callable[[str, int, "int | None"], None]


@dataclass
class PrepareResult:
    """Where the dataset dir is, its meta.json, and whether an up-to-date one was found and kept."""

    path: Path
    meta: dict
    skipped: bool


class DatasetBuild:
    """One prepare of the dataset dir `out_dir` of `task`: its input files (by group, e.g. "sources" and
    "val_sources") checked against the dir and hashed, a reused tokenizer checked, and the fingerprint of
    it all, computed on construction, before any source is read.

    `extra` adds what else decides the files (a chat template); `tokenizer_from` names where a reused
    `tokenizer` comes from in messages.
    """

    def __init__(self, task: str, data: DataConfig, out_dir: Path, *, seed: int, inputs: dict[str, list[Path]],
                 specs: list[SourceSpec], skipped: SkippedFiles, tokenizer: Path | None = None,
                 tokenizer_from: str = "data.tokenizer", extra: dict[str, Any] | None = None,
                 on_progress: Progress | None = None):
        self.task, self.data, self.seed, self.skipped = task, data, seed, skipped
        self.out = DatasetDir(Path(out_dir))
        refuse_unsafe_out_dir(self.out, [p for paths in inputs.values() for p in paths], specs)
        self.inputs = {group: [hash_file(p) for p in paths] for group, paths in inputs.items()}
        self.reused, self.tokenizer_from = tokenizer, tokenizer_from
        self.tokenizer_sha256 = None
        if tokenizer is not None:
            load_tokenizer(tokenizer)  # a clear error for a missing or broken file before anything else
            self.tokenizer_sha256 = hash_file(tokenizer)["sha256"]
        self.fingerprint = self._fingerprint(extra or {})
        self._on_progress = on_progress

    def _fingerprint(self, extra: dict[str, Any]) -> str:
        """sha256 over everything that decides the files: the task, the data section (but `dir`), each
        input file's path, size and hash, the reused tokenizer's hash, the seed and `extra`."""
        payload = {
            "prepare_version": PREPARE_VERSION,
            "task": self.task,
            "data": self.data.model_dump(mode="json", exclude={"dir"}),
            "inputs": {group: [[f["path"], f["bytes"], f["sha256"]] for f in files] for group, files in self.inputs.items()},
            "tokenizer_sha256": self.tokenizer_sha256,
            "seed": self.seed,
            **extra,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    def current(self, open_dataset: Callable[[Path], Any]) -> PrepareResult | None:
        """The dataset dir as it is, when its meta.json has this fingerprint and `open_dataset` (the task's
        reader) reads every split of it whole; else None."""
        if not self.out.meta.is_file() or not self.out.tokenizer.is_file():
            return None
        try:
            meta = read_json_artifact(self.out.meta, "dataset dir")
            if meta.get("fingerprint") != self.fingerprint:
                return None
            dataset = open_dataset(self.out.path)
            for name in SPLITS:
                dataset.split(name)  # refuses a file that disagrees with meta.json
        except (LlmctlError, KeyError, TypeError, ValueError, OSError):
            return None
        return PrepareResult(self.out.path, meta, skipped=True)

    def report(self, stage: str, done: int, total: int | None) -> None:
        """Report progress of `stage` ("tokenizer", "merges", "encode"): `done` of `total` bytes of text."""
        if self._on_progress is not None:
            self._on_progress(stage, done, total)

    def counter(self, stage: str, total: int | None) -> Callable[[int], None]:
        """A callback that adds the bytes it is given to `stage`'s count and reports it against `total`."""
        done = 0

        def add(n: int) -> None:
            nonlocal done
            done += n
            self.report(stage, done, total)

        return add

    def refuse_changed(self, group: str, stats: SourceStats) -> None:
        """Refuse an input of `group` whose bytes, as a pass read them (`stats.files`), are not those hashed."""
        refuse_changed_inputs(self.inputs[group], stats.files)

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """The staging dir to write into; it replaces the dataset dir when the block ends without error."""
        with staged_dir(self.out.path, f"the dataset dir {self.out.path}") as stage:
            yield stage

    def reused_tokenizer(self) -> Tokenizer:
        """The reused tokenizer, refused when it lacks the end-of-text token (data.special_tokens[0])."""
        tok = load_tokenizer(self.reused)
        eos = self.data.special_tokens[0]
        if tok.token_to_id(eos) is None:
            drop = ", or drop data.tokenizer to train a new one" if self.tokenizer_from == "data.tokenizer" else ""
            raise LlmctlError(
                f"{self.tokenizer_from} {str(self.reused)!r}: has no token {eos!r} (data.special_tokens[0], the "
                f"end-of-text token); list one the tokenizer has first in data.special_tokens{drop}."
            )
        return tok

    def train_on(self, texts: list[str]) -> Tokenizer:
        """A tokenizer trained on `texts` (held in memory), reported as one step of the "tokenizer" stage."""
        total = sum(len(t.encode("utf-8")) for t in texts)
        self.report("tokenizer", 0, total)
        tok = train_tokenizer(texts, self.data.vocab_size, self.data.min_frequency, self.data.special_tokens)
        self.report("tokenizer", total, total)
        return tok

    def save_tokenizer(self, stage: Path, tok: Tokenizer) -> int:
        """Write tokenizer.json into `stage` (the reused file copied byte for byte); returns the end-of-text id."""
        if self.reused is not None:
            shutil.copyfile(self.reused, stage / "tokenizer.json")
        else:
            tok.save(str(stage / "tokenizer.json"))
        return eot_id(tok, self.data.special_tokens)

    def sources_record(self, group: str, stats: SourceStats, **counts: Any) -> dict[str, Any]:
        """meta.json's record of the input files of `group`: how many, their bytes and hashes, `counts`
        (rows, documents, text bytes) and what replacing undecodable bytes introduced."""
        files = self.inputs[group]
        record = {
            "files": len(files),
            "bytes": sum(f["bytes"] for f in files),
            **counts,
            "sha256": hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest(),
            "replaced_chars": stats.replaced_chars,
            "list": files,
        }
        if group == "sources":
            record["skipped_files"] = self.skipped.to_dict()
        return record

    def write_meta(self, stage: Path, tok: Tokenizer, fields: dict[str, Any]) -> PrepareResult:
        """Write meta.json into `stage`: the task, the tokenizer's figures, the task's `fields` and the
        provenance every dataset dir records."""
        meta = {
            "task": self.task,
            "vocab_size": tok.get_vocab_size(),
            "eot_id": eot_id(tok, self.data.special_tokens),
            "special_tokens": list(self.data.special_tokens),
            **fields,
            "tokenizer": {"trained": self.reused is None, "source": str(self.reused) if self.reused else None,
                          "sha256": self.tokenizer_sha256},
            "fingerprint": self.fingerprint,
            "data": self.data.model_dump(mode="json"),
            "seed": self.seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "llmctl_version": __version__,
        }
        write_json_atomic(stage / "meta.json", meta)
        return PrepareResult(self.out.path, {"format_version": FORMAT_VERSION, **meta}, skipped=False)


def refuse_unsafe_out_dir(out: DatasetDir, sources: list[Path], specs: list[SourceSpec] = ()) -> None:
    """Refuse a data.dir that is a file, another kind of directory, holds a source, or lies inside a
    directory source (the next prepare would read its own output)."""
    # replace_dir_atomic deletes whatever was at out_dir: only ever an earlier dataset dir.
    if out.path.exists():
        if not out.path.is_dir():
            raise LlmctlError(f"{out.path}: exists and is not a directory; set data.dir to a dataset dir path.")
        if any(out.path.iterdir()) and not out.meta.is_file():
            raise LlmctlError(
                f"{out.path}: exists and is not a dataset dir (no meta.json); prepare would replace it. "
                "Set data.dir to a new path, or remove that directory."
            )
    root = out.path.resolve()
    for p in sources:
        if root in p.resolve().parents:
            raise LlmctlError(
                f"{p}: a source inside the dataset dir {out.path}, which prepare replaces; "
                "move the source or set data.dir elsewhere."
            )
    for i, spec in enumerate(specs):
        folder = Path(spec.path)
        if not spec.path.startswith("builtin:") and folder.is_dir() and folder.resolve() in root.parents:
            raise LlmctlError(
                f"data.dir {out.path}: inside the directory source data.sources[{i}] {spec.path!r}, so the next prepare "
                "would read its own output; set data.dir outside it."
            )


def refuse_changed_inputs(inputs: list[dict], read: list[dict]) -> None:
    """Refuse a file whose hash as a pass read it differs from the hash taken before reading began."""
    hashed = {f["path"]: f["sha256"] for f in inputs}
    for f in read:
        if hashed.get(f["path"]) != f["sha256"]:
            raise LlmctlError(
                f"{f['path']}: changed while prepare was reading it; run prepare again once it is settled.",
                kind="input_changed",
                exit_code=EXIT_FAILURE,
            )
