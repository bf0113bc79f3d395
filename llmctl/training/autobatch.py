"""`micro_batch_size: auto` on a GPU: find the largest micro-batch that runs, by trying.

The estimate (memory.py) proposes where to start; Accelerate's `find_executable_batch_size`
then tries a real forward and backward at each size, stepping down through the sizes that keep
the recipe's global batch exact. While trying, a block of the optimizer state's size is held, as
the first optimizer step will need it.
"""

from __future__ import annotations

from typing import Any, Callable


def compatible_micro_batches(batch_size: int, processes: int) -> list[int]:
    """Micro-batch sizes m with batch_size % (m * processes) == 0, largest first."""
    per_process = batch_size // processes
    return [m for m in range(per_process, 0, -1) if per_process % m == 0 and batch_size % (m * processes) == 0]


def probe_micro_batch(
    accelerator: Any,
    model: Any,
    step_loss: Callable[[Any, int], Any],
    candidates: list[int],
    reserve_bytes: int,
) -> int:
    """The largest of `candidates` (largest first) for which `step_loss(model, m)` and its backward run.

    Every process tries on its own (no gradient sync), then all take the smallest size found.
    """
    import torch
    from accelerate.utils import find_executable_batch_size

    remaining = iter(candidates[1:])

    def next_smaller() -> int:
        return next(remaining, 0)

    @find_executable_batch_size(starting_batch_size=candidates[0], reduce_batch_size_fn=next_smaller)
    def attempt(m: int) -> int:
        reserve = torch.empty(max(reserve_bytes, 0), dtype=torch.uint8, device=accelerator.device)
        try:
            with accelerator.no_sync(model):
                step_loss(model, m).backward()
        finally:
            model.zero_grad(set_to_none=True)
            del reserve
        return m

    found = attempt()
    sizes = accelerator.gather(torch.tensor([found], device=accelerator.device))
    return int(sizes.min())
