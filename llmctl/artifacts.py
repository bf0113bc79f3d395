"""Where every artifact file lives, and how it is written (atomically).

Each artifact directory of DESIGN.md has one small class here that knows its
layout, so no command spells out a path string of its own.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llmctl.errors import LlmctlError

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read once (reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path | int, *, directory: bool) -> None:
    """Give a file or dir made by mkstemp/mkdtemp (0600/0700) the mode a plain open/mkdir would."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _usual_mode(fd, directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write a JSON artifact with `format_version` added, atomically."""
    payload = {"format_version": FORMAT_VERSION, **obj}
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json_artifact(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON artifact, refusing a missing, broken or newer-format file with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise LlmctlError(f"{path}: missing; {what} needs this file.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmctlError(f"{path}: not valid JSON ({e}); the {what} is damaged.") from None
    if not isinstance(obj, dict):
        raise LlmctlError(f"{path}: expected a JSON object; the {what} is damaged.")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LlmctlError(
            f"{path}: format_version {version!r} is not one this llmctl ({FORMAT_VERSION}) can read; "
            "upgrade llmctl or recreate the artifact."
        )
    return obj


def replace_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` into place as `final_dir`, replacing any old one."""
    final_dir = Path(final_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out_dir: Path, *, overwrite: bool, sources: list[Path], marker: str) -> None:
    """Refuse an output path that is a file, one of the inputs, or an existing dir without --overwrite.

    `--overwrite` replaces only a dir of the same kind (one holding `marker`, e.g. config.json), never
    some other non-empty directory a mistyped path happens to name.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmctlError(f"-o {out_dir}: an existing file; name a directory to create.")
    for src in sources:
        if out_dir.resolve() == Path(src).resolve():
            raise LlmctlError(f"-o {out_dir}: the same directory as the input; name a new one.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / marker).is_file():
            raise LlmctlError(f"-o {out_dir}: an existing directory with other content (no {marker}); name a new one.")
        if not overwrite:
            raise LlmctlError(f"-o {out_dir}: exists; pass --overwrite to replace it.")


def staging_dir(final_dir: Path) -> Path:
    """A fresh temporary directory beside `final_dir`, for writing before `replace_dir_atomic`."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    _usual_mode(tmp, directory=True)
    return tmp


@dataclass(frozen=True)
class DatasetDir:
    """`prepare`'s output: tokenizer, flat token shards and their metadata."""

    path: Path

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    def split(self, name: str) -> Path:
        return self.path / f"{name}.bin"

    def exists(self) -> bool:
        return self.meta.is_file()

    def read_meta(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise LlmctlError(f"{self.path}: no such dataset dir; run `llmctl prepare RECIPE` first.")
        return read_json_artifact(self.meta, "dataset dir")


@dataclass(frozen=True)
class ModelDir:
    """A trained (or compressed) model: config, safetensors weights, tokenizer, provenance."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def provenance(self) -> Path:
        return self.path / "llmctl.json"

    def check(self) -> None:
        """Refuse a directory that is not a model dir, naming what is missing."""
        if not self.path.is_dir():
            raise LlmctlError(f"{self.path}: no such model dir.")
        missing = [p.name for p in (self.config, self.weights, self.tokenizer) if not p.is_file()]
        if missing:
            raise LlmctlError(
                f"{self.path}: not a model dir (missing {', '.join(missing)}); "
                "a model dir is what `llmctl train` writes to runs/<name>/model/."
            )


@dataclass(frozen=True)
class ExportDir:
    """`export`'s ONNX output: the graph(s), the tokenizer, the model's config and export.json."""

    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "export.json"

    @property
    def onnx(self) -> Path:
        return self.path / "model.onnx"

    @property
    def onnx_int8(self) -> Path:
        return self.path / "model.int8.onnx"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def provenance(self) -> Path:
        return self.path / "llmctl.json"

    def is_export(self) -> bool:
        return self.manifest.is_file()


@dataclass(frozen=True)
class RunDir:
    """`train`'s output: resolved recipe, metrics log, checkpoints and the final model."""

    path: Path

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def best(self) -> ModelDir:
        return ModelDir(self.checkpoints / "best")

    @property
    def model(self) -> ModelDir:
        return ModelDir(self.path / "model")

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete step checkpoints, oldest first (half-written ones have a temporary name)."""
        found = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                    found.append((int(p.name[5:]), p))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = self.step_checkpoints()
        return found[-1] if found else None


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a metrics.jsonl file, skipping a torn last line left by a crash."""
    if not Path(path).is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


@dataclass(frozen=True)
class StudyDir:
    """`tune`'s output: the Optuna storage, one run dir per trial, the best recipe, a table and plots."""

    path: Path

    @property
    def storage_file(self) -> Path:
        return self.path / "study.db"

    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def trials(self) -> Path:
        return self.path / "trials"

    def trial(self, number: int) -> Path:
        return self.trials / f"trial-{number:04d}"

    @property
    def best_recipe(self) -> Path:
        return self.path / "best.yaml"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def plot(self, name: str) -> Path:
        return self.path / f"{name}.png"
