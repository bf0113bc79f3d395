"""What the server asks of the thread that owns a model, whatever the task: the generation engine
(engine.py) and the classifier runner (classify.py) both start, stop (draining or not), report how
many requests wait and how many run, and refuse a request with one of the two exceptions below,
which the HTTP layer answers as one 503 each (`llmctl.serving.requests.queued`).

How a request is submitted differs by task (a generation request, encoded texts), so `submit` is
each runner's own; the task's routes know which runner they hold.
"""

from __future__ import annotations

from typing import Protocol


class QueueFull(Exception):
    """`max_queue` requests already wait for the model; the caller should answer 503 / retry later."""


class Stopped(RuntimeError):
    """The runner is stopping or stopped and takes no new requests."""


class Runner(Protocol):
    """The model's owner thread as the server drives it (engine.Engine, classify.ClassifierRunner)."""

    max_queue: int  # requests (a language model: sequences) that may wait before QueueFull

    @property
    def queue_depth(self) -> int:
        """Requests waiting, not yet running."""

    @property
    def batch_size(self) -> int:
        """Requests (sequences, texts) running now."""

    def start(self) -> None:
        """Start the owner thread."""

    def stop(self, drain: bool = True) -> None:
        """Take no new requests; finish the waiting and running ones first (`drain`) or cancel them."""
