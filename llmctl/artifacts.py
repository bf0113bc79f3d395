"""Where every artifact file lives, and how it is written (atomically).

Each artifact directory of DESIGN.md has one small class here that knows its
layout, so no command spells out a path string of its own.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llmctl.errors import EXIT_FAILURE, LlmctlError

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


def usual_mode(path: Path | int, *, directory: bool = False) -> None:
    """Give a file or dir made private (mkstemp/mkdtemp, safetensors' own temporary: 0600/0700) the mode
    a plain open/mkdir would, so every file of an artifact has the same (umask's) permissions."""
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
        usual_mode(fd, directory=False)
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
    usual_mode(tmp, directory=True)
    return tmp


# --- when a write fails ----------------------------------------------------------------------------

_FREE_SPACE = "free some space"
_MAKE_WRITABLE = "make it writable (or choose another path)"
# errno -> (the cause in words, what a person does about it)
_WRITE_ERRNOS = {
    errno.ENOSPC: ("no space left on device", _FREE_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _FREE_SPACE),
    errno.EFBIG: ("file too large for that filesystem", "write to another filesystem"),
    errno.EACCES: ("permission denied", _MAKE_WRITABLE),
    errno.EPERM: ("operation not permitted", _MAKE_WRITABLE),
    errno.EROFS: ("read-only file system", _MAKE_WRITABLE),
}
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Below this many free bytes, a writer's failure that hides its errno is taken for a full disk: torch's
# zip writer, on a short write, says only "[enforce fail at inline_container.cc] unexpected pos ...".
LOW_SPACE_BYTES = 1 << 20


class WriteFailed(LlmctlError):
    """A write that failed for a reason fixed on the machine, not in the input: a full disk, a refused
    permission (exit 1). `problem` names the write, the path, the cause and the free space; `kept` says
    what is still intact; `remedy` what to do, which a caller that knows more (the trainer: the newest
    checkpoint and --resume) replaces through `with_remedy`. `fix` is the remedy's verb ("free some space")."""

    def __init__(self, problem: str, *, kept: str, remedy: str, fix: str, kind: str):
        super().__init__(" ".join(part for part in (problem, kept, remedy) if part), kind=kind, exit_code=EXIT_FAILURE)
        self.problem, self.kept, self.remedy, self.fix = problem, kept, remedy, fix

    def with_remedy(self, remedy: str) -> "WriteFailed":
        return WriteFailed(self.problem, kept=self.kept, remedy=remedy, fix=self.fix, kind=self.kind)


def free_bytes(path: Path) -> int | None:
    """Bytes this process may still write on the filesystem holding `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _write_errno(error: BaseException, target: Path) -> int | None:
    """The errno of `_WRITE_ERRNOS` behind a failed write, read from the error or, when the writer hid
    it, inferred from a nearly full disk; None for any other failure."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return error.errno
    text = str(error)
    if "database or disk is full" in text:  # SQLite's own words (the tune study's storage)
        return errno.ENOSPC
    for code in _WRITE_ERRNOS:
        # Rust writers (safetensors, tokenizers) end with "(os error 28)"; shutil.Error lists "[Errno 28] ...".
        if f"os error {code})" in text or f"[Errno {code}]" in text or os.strerror(code) in text:
            return code
    writer_error = isinstance(error, (OSError, RuntimeError)) or type(error).__name__ in {"Exception", "SafetensorError"}
    free = free_bytes(target)
    if writer_error and free is not None and free < LOW_SPACE_BYTES:
        return errno.ENOSPC
    return None


def _failed_file(error: BaseException) -> str | None:
    """The file a failed write names, if it names one (shutil.Error: the first destination of its list)."""
    name = getattr(error, "filename", None)
    if name is None and isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list):
        first = error.args[0][0] if error.args[0] else None
        name = first[1] if isinstance(first, tuple) and len(first) == 3 else None
    return os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else None


def write_failure(error: BaseException, what: str, target: Path, *, kept: str = "") -> WriteFailed | None:
    """The one-paragraph WriteFailed (exit 1) for `error` raised while writing `what` (e.g. "the
    checkpoint runs/x/checkpoints/step-10") at `target`, when a full disk or a refused permission caused
    it; None for any other error, which the caller re-raises. `kept` says what is still intact."""
    code = _write_errno(error, target)
    return None if code is None else _failure(code, error, what, target, kept=kept)


def _newest_file(folder: Path) -> str | None:
    """The file written last below `folder`: where a writer that names no file was when it failed."""
    try:
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        return str(max(files, key=lambda p: p.stat().st_mtime_ns)) if files else None
    except OSError:
        return None


def _failure(code: int, error: BaseException, what: str, target: Path, *, kept: str,
             free_before: int | None = None, file: str | None = None) -> WriteFailed:
    """`free_before`: free bytes measured before the partial write was removed (the message gives both);
    `file`: the file being written, when the error itself names none."""
    cause, fix = _WRITE_ERRNOS[code]
    file = _failed_file(error) or file
    # write_atomic's temporary (.NAME.<random>.tmp) is, to the user, the target itself: not named apart
    shown = Path(file).name if file else ""
    if shown.startswith(f".{Path(target).name}.") and shown.endswith(".tmp"):
        shown = ""
    named = f" ({shown})" if shown and shown != Path(target).name else ""
    problem = f"cannot write {what}{named}: {cause}"
    if code in _SPACE_ERRNOS:
        from llmctl.units import human_bytes

        now = free_bytes(target)
        if free_before is not None and now is not None and now != free_before:
            problem += f"; {human_bytes(free_before)} was free there, {human_bytes(now)} after removing the partial write"
        else:
            problem += f"; {human_bytes(now)} free there"
    kind = "disk_full" if code in _SPACE_ERRNOS else "not_writable"
    return WriteFailed(problem + ".", kept=kept, remedy=f"{fix[0].upper()}{fix[1:]}, then run the command again.",
                       fix=fix, kind=kind)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree, whichever `path` is, if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(what: str, target: Path, *, partial: Path | None = None, kept: str = "") -> Iterator[None]:
    """Guard a write of `what` at `target`: on any failure remove `partial` (the temporary file or dir
    being written), and turn a full disk or a refused permission into a one-line WriteFailed (exit 1)
    instead of the writer's own error. An LlmctlError passes through unchanged (after the clean-up)."""
    try:
        yield
    except BaseException as error:
        free_before = free_bytes(target)
        code = _write_errno(error, target) if isinstance(error, Exception) and not isinstance(error, LlmctlError) else None
        file = _newest_file(partial) if code is not None and partial is not None and Path(partial).is_dir() else None
        if partial is not None:
            remove_path(partial)
        if code is None:
            raise
        raise _failure(code, error, what, target, kept=kept, free_before=free_before if partial else None,
                       file=file) from None


@contextmanager
def staged_dir(final_dir: Path, what: str) -> Iterator[Path]:
    """A fresh staging dir beside `final_dir` to write `what` into; when the block ends it replaces
    `final_dir` atomically, and when the block fails it is removed (a full disk or a refused permission
    becoming a WriteFailed that says the earlier `final_dir`, if any, is unchanged)."""
    final_dir = Path(final_dir)
    kept = f"The earlier {final_dir} is unchanged." if final_dir.exists() else ""
    with writing(what, final_dir, kept=kept):
        tmp = staging_dir(final_dir)
    with writing(what, final_dir, partial=tmp, kept=kept):
        yield tmp
        replace_dir_atomic(tmp, final_dir)


def append_line(path: Path, line: str) -> None:
    """Append `line` (with its newline) to `path` whole or not at all: a write that fails part-way is cut
    back off, so a full disk never leaves a torn row in a log."""
    raw = memoryview(line.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            while raw:
                raw = raw[os.write(fd, raw):]
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def refuse_output_over_inputs(flag: str, out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output path that is one of the inputs (`(what, path)` pairs) or lies inside one."""
    out = Path(out)
    resolved = out.resolve()
    for what, path in inputs:
        source = Path(path).resolve()
        if resolved == source:
            raise LlmctlError(f"{flag} {out}: the same path as {what} ({path}), which this command reads; "
                              "name a new directory.")
        if source in resolved.parents:
            raise LlmctlError(f"{flag} {out}: inside {what} ({path}), which this command reads; "
                              "name a directory outside it.")


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
class HFModelDir(ModelDir):
    """A Hugging Face model dir (what `save_pretrained` writes, and `llmctl export --format hf`): a model
    dir's config.json (HF's own), model.safetensors and tokenizer.json, and HF's other files."""

    @property
    def weights_index(self) -> Path:
        return self.path / "model.safetensors.index.json"

    @property
    def tokenizer_config(self) -> Path:
        return self.path / "tokenizer_config.json"

    @property
    def generation_config(self) -> Path:
        return self.path / "generation_config.json"

    @property
    def manifest(self) -> Path:
        """export.json: written by `llmctl export --format hf` only."""
        return self.path / "export.json"

    def holds_hf_config(self) -> bool:
        """Whether config.json is HF's: a `model_type` (llmctl's own config.json names a `family`)."""
        try:
            config = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and "model_type" in config and "family" not in config


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

    def stale_temporaries(self) -> list[Path]:
        """What an interrupted run left half-written: the staging dirs of model/ and checkpoints/best/,
        step checkpoints never renamed, the `.old` dirs a replacement moves aside, and the temporaries of
        atomic file writes. None of them is ever read; a run that starts removes them."""
        patterns = {
            self.path: (".model.*.tmp", ".model.old", f".{self.metrics.name}.*.tmp", f".{self.recipe.name}.*.tmp"),
            self.checkpoints: (".step-*.tmp", ".step-*.old", ".best.*.tmp", ".best.old"),
        }
        return sorted(p for folder, globs in patterns.items() if folder.is_dir() for g in globs for p in folder.glob(g))


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
