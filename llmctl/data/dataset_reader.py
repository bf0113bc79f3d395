"""Reading a dataset dir back, the same way for every task: meta.json is read once, its task checked and
the fields a reader needs converted (one message for a damaged file), and each split file is checked
against the count meta.json records before it is memory-mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmctl.artifacts import DatasetDir
from llmctl.errors import LlmctlError

SPLITS = ("train", "val")
_REBUILD = "the dataset dir is damaged, run `llmctl prepare --force`"


class PreparedDataset:
    """A dataset dir of one of `TASKS` as prepare wrote it. A subclass names its tasks, the message for a
    dataset of another task (`{path}` and `{task}` filled in), and reads its fields in `read_fields`."""

    TASKS: tuple[str, ...] = ()
    WRONG_TASK = "{path}: a {task} dataset dir, not one this command reads."

    def __init__(self, path: str | Path):
        self.dir = DatasetDir(Path(path))
        self.meta = self.dir.read_meta()
        task = self.meta.get("task", "lm")  # dirs written before meta.json recorded the task are lm's
        if task not in self.TASKS:
            raise LlmctlError(self.WRONG_TASK.format(path=self.dir.path, task=task))
        try:
            self._splits = {name: dict(self.meta["splits"][name]) for name in SPLITS}
            self.vocab_size = int(self.meta["vocab_size"])
            self.read_fields(self.meta)
        except (KeyError, TypeError, ValueError) as e:
            raise LlmctlError(f"{self.dir.meta}: damaged ({e!r} missing or malformed); run `llmctl prepare --force`.") from None

    def read_fields(self, meta: dict[str, Any]) -> None:
        """Set the task's own fields from meta.json (a KeyError, TypeError or ValueError: it is damaged)."""

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def tokenizer_path(self) -> Path:
        return self.dir.tokenizer

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("fingerprint")

    def count(self, name: str, key: str) -> int:
        """meta.json's `key` count (tokens, examples) of split `name`; refuses an unknown split."""
        if name not in self._splits:
            raise LlmctlError(f"{self.dir.meta}: no split {name!r} (has {', '.join(self._splits)}).")
        return int(self._splits[name][key])


def memmap_file(path: Path, dtype: Any, count: int) -> np.ndarray:
    """The `count` values of `dtype` in the flat file `path`, read-only through numpy.memmap; refuses a
    missing file or one whose size disagrees with meta.json."""
    dtype = np.dtype(dtype)
    if not path.is_file():
        raise LlmctlError(f"{path}: missing; {_REBUILD}.")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise LlmctlError(
            f"{path}: {size} bytes, but meta.json says {count} {dtype.name} values ({count * dtype.itemsize} bytes); "
            f"{_REBUILD}."
        )
    if count == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def load_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The .npy array at `path`, memory-mapped; refuses a missing or unreadable file, or one whose shape
    is not the `shape` meta.json implies."""
    if not path.is_file():
        raise LlmctlError(f"{path}: missing; {_REBUILD}.")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise LlmctlError(f"{path}: not a readable .npy file ({e}); {_REBUILD}.") from None
    if array.shape != shape:
        raise LlmctlError(f"{path}: shape {array.shape}, but meta.json says {shape}; {_REBUILD}.")
    return array
