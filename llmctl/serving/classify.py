"""Sequence classification behind `llmctl serve` (POST /v1/classify): what a classifier's config.json
says about its inputs and outputs, and the runner that owns the model.

One background thread owns the model, so it is never used by two threads at once. Requests queue
their encoded texts; each turn the thread takes every request waiting, in arrival order, up to
`max_texts` texts, and runs them as one forward (a request's texts always stay together). Rows are
right-padded to the longest text of that forward, and the classifiers never read padding (packed
sequences, causal attention), so a text's probabilities do not depend on what it is batched with
beyond float rounding (~1e-7).

Works over any classifier that `load_for_inference` returns: a torch model dir or an ONNX Runtime
export dir, both called as `model(ids (B, T), lengths (B,)) -> logits`. The runner is a
`llmctl.serving.runner.Runner`; the routes over it are the classification task's
(`llmctl.tasks.classification.serving`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from llmctl.errors import LlmctlError
from llmctl.serving.runner import QueueFull, Stopped

log = logging.getLogger(__name__)

PROBABILITY_DIGITS = 6  # as `llmctl eval --predict` writes them


@dataclass(frozen=True)
class ClassifierSpec:
    """A classifier's contract as its config.json records it: class names in class order, and how texts
    are encoded (the first `max_len` tokens, right-padded with `pad_id`)."""

    labels: tuple[str, ...]
    max_len: int  # tokens per text
    pad_id: int

    @staticmethod
    def is_classifier(config: dict[str, Any]) -> bool:
        """Whether a model or export dir's config.json describes a classifier (as the task registry reads it)."""
        from llmctl.tasks import task_of_config

        return task_of_config(config).name == "classification"

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> "ClassifierSpec":
        """The spec of a classifier's config.json (`where` names the file in errors); LlmctlError if incomplete."""
        num_classes, labels = config.get("num_classes"), config.get("labels")
        max_len, pad_id = config.get("max_len"), config.get("pad_id")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise LlmctlError(f"{where}: num_classes must be an integer >= 2, got {num_classes!r}; the dir is damaged.")
        if not isinstance(labels, list) or len(labels) != num_classes:
            raise LlmctlError(f"{where}: a classifier needs its {num_classes} class names in `labels`; retrain it with "
                              "this llmctl.")
        names = tuple(str(label) for label in labels)
        if len(set(names)) != len(names):
            raise LlmctlError(f"{where}: labels {list(names)} name a class twice.")
        if not isinstance(max_len, int) or max_len < 1 or not isinstance(pad_id, int) or pad_id < 0:
            raise LlmctlError(f"{where}: a classifier needs integer max_len and pad_id (how its texts were "
                              "encoded); retrain it with this llmctl.")
        return cls(names, max_len, pad_id)

    def encode(self, tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids as training saw them: (ids int32 (N, max_len), lengths int32 (N,)); no text may be blank."""
        from llmctl.data.labelled import encode_for_classification

        return encode_for_classification(tokenizer, texts, self.max_len, self.pad_id)

    def results(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """One {"index", "label", "probabilities"} per row of probs (N, num_classes); label = the argmax."""
        out = []
        for i, row in enumerate(np.asarray(probs, dtype=np.float64)):
            out.append({
                "index": i,
                "label": self.labels[int(row.argmax())],
                "probabilities": {name: round(float(p), PROBABILITY_DIGITS) for name, p in zip(self.labels, row)},
            })
        return out


@dataclass
class _Pending:
    ids: np.ndarray  # (n, max_len) int32
    lengths: np.ndarray  # (n,) int32
    future: Future


class ClassifierRunner:
    """The thread that owns a classifier: `submit` encoded texts, get a Future of their probabilities."""

    def __init__(self, model: Any, *, max_texts: int, max_queue: int,
                 on_forward: Callable[[int], None] | None = None):
        self.model, self.max_texts, self.max_queue = model, max_texts, max_queue
        self.on_forward = on_forward or (lambda texts: None)
        self._waiting: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running_texts = 0
        self._thread = threading.Thread(target=self._loop, name="llmctl-classify", daemon=True)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a forward."""
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        """Texts in the forward running now (0 when idle)."""
        return self._running_texts

    def start(self) -> None:
        self._thread.start()

    def submit(self, ids: np.ndarray, lengths: np.ndarray) -> Future:
        """Queue one request's texts; the Future gives their probabilities (n, num_classes) as float32.
        Cancelling it before its forward starts drops the request. Raises QueueFull or Stopped."""
        if not 1 <= len(lengths) <= self.max_texts:
            raise ValueError(f"a request holds 1 to {self.max_texts} texts, got {len(lengths)}")
        pending = _Pending(ids, lengths, Future())
        with self._cond:
            if self._stopping:
                raise Stopped("the classifier is stopping")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting")
            self._waiting.append(pending)
            self._cond.notify()
        return pending.future

    def stop(self, drain: bool = True) -> None:
        """Take no new requests; answer the waiting ones first (`drain`) or cancel them; wait for the thread."""
        with self._cond:
            self._stopping = True
            if not drain:
                while self._waiting:
                    self._waiting.popleft().future.cancel()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _next_group(self) -> list[_Pending] | None:
        """The requests of the next forward (None: stopped and nothing left), waiting for one to arrive."""
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            group, texts = [], 0
            while self._waiting and texts + len(self._waiting[0].lengths) <= self.max_texts:
                pending = self._waiting.popleft()
                if pending.future.set_running_or_notify_cancel():  # False: its client went away
                    group.append(pending)
                    texts += len(pending.lengths)
            if not group and not self._waiting:
                return None if self._stopping else []
            self._running_texts = texts
            return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            if not group:
                continue
            try:
                probs = self.forward(np.concatenate([p.ids for p in group]),
                                     np.concatenate([p.lengths for p in group]))
                self.on_forward(len(probs))
            except BaseException as e:  # answered as a 500 to each request of the group; the thread lives on
                log.exception("classification forward failed")
                for pending in group:
                    pending.future.set_exception(e)
            else:
                start = 0
                for pending in group:
                    n = len(pending.lengths)
                    pending.future.set_result(probs[start : start + n])
                    start += n
            finally:
                self._running_texts = 0

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) float32 of ids (N, max_len), lengths (N,), cut to the longest text."""
        import torch

        from llmctl.models.classifiers import class_probabilities

        width = max(int(lengths.max()), 1)
        x = torch.as_tensor(np.ascontiguousarray(ids[:, :width], dtype=np.int64))  # (N, T)
        n = torch.as_tensor(np.asarray(lengths, dtype=np.int64))  # (N,)
        with torch.inference_mode():
            return class_probabilities(self.model(x, n)).float().cpu().numpy()  # (N, C)
