"""How long work says how far it is, without knowing who watches.

Engines take a `Progress` and call `stage(text, unit)` when a stage starts and `update(done, total)`
as its counted work gets done (tokens scored, layers quantized, bytes read). Functions that only
count take the narrower `on_progress(done, total)` callback, which `Progress.update` is. This base
class shows nothing (library use, tests); the CLI's subclass draws bars with an ETA on a terminal
and prints plain periodic lines otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

OnProgress = Callable[[float, "float | None"], None]


class Progress:
    """Silent progress: every call does nothing. A context manager, so that a display can be closed."""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def stage(self, text: str, unit: str = "") -> None:
        """A new stage starts (the previous one is finished); `unit` names what `update` counts."""

    def update(self, done: float, total: float | None = None) -> None:
        """`done` of `total` units of the current stage are finished (total None: not known)."""

    def note(self, text: str) -> None:
        """A line for the person watching that is not a stage (a warning, a figure)."""


def silent_if_none(progress: Progress | None) -> Progress:
    return progress if progress is not None else Progress()


def read_ahead(files: list[Path], on_progress: OnProgress, chunk_bytes: int = 16 << 20) -> int:
    """Read `files` once, counting bytes, so that the load after it (safetensors, ONNX Runtime: one call
    each, which reports nothing) finds them in the page cache; the I/O is what takes long on a cold
    start. Returns the bytes read."""
    total = sum(f.stat().st_size for f in files)
    done = 0
    on_progress(0, total)
    for f in files:
        with open(f, "rb", buffering=0) as stream:
            while block := stream.read(chunk_bytes):
                done += len(block)
                on_progress(done, total)
    return total
