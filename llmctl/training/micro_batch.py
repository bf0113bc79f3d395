"""The micro-batch a run steps with and the memory plan for it: given, one process's share of the batch, or
under `micro_batch_size: auto` the largest the memory estimate fits (and on CUDA, the largest a real step runs)."""

from __future__ import annotations

from typing import Any, Callable

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError
from llmctl.training.run_checks import check_batch_split


def resolve_micro_batch(recipe: Recipe, processes: int, device: str, vocab_size: int) -> tuple[int, Any]:
    """The micro-batch to run (choosing it under `auto`) and the memory plan for it (None for a task whose
    models the planner does not cover).

    `vocab_size` is the dataset tokenizer's, used when the recipe leaves model.vocab_size null.
    """
    from llmctl.tasks import task_named
    from llmctl.training.memory import choose_micro_batch, estimate_memory, free_device_memory
    from llmctl.units import parse_memory

    cfg = recipe.train
    shape = task_named(recipe.data.task).training.planned_shape(recipe, vocab_size)
    if shape is None:
        if cfg.micro_batch_size == "auto":
            raise LlmctlError("train.micro_batch_size: auto plans the memory of language models; give a number "
                              f"(or null) for {recipe.data.task}.")
        check_batch_split(cfg, processes)
        return cfg.micro_batch_size or cfg.batch_size // processes, None
    budget = parse_memory(cfg.max_memory) if cfg.max_memory is not None else free_device_memory(device)
    micro = cfg.micro_batch_size
    if micro == "auto":
        if budget is None:
            raise LlmctlError("train.micro_batch_size: auto needs train.max_memory on a device whose free memory is unknown.")
        micro = choose_micro_batch(
            shape, cfg.optimizer, cfg.precision, cfg.batch_size, processes, budget,
            strategy=cfg.strategy, device=device,
        )
    if micro is None:
        check_batch_split(cfg, processes)
        micro = cfg.batch_size // processes  # each process its share of the batch, no accumulation
    plan = estimate_memory(
        shape, cfg.optimizer, cfg.precision, micro,
        processes=processes, strategy=cfg.strategy, device=device, budget_bytes=budget,
    )
    return micro, plan


def probe_on_gpu(accelerator: Any, model: Any, step_loss: Callable[[Any, int], Any], recipe: Recipe, world: int,
                 estimated: int, plan: Any) -> tuple[int, Any]:
    """On CUDA, `auto` tries real steps (`step_loss(model, size)`) from twice the estimate down; returns the
    size and its plan."""
    from llmctl.training.autobatch import compatible_micro_batches, probe_micro_batch
    from llmctl.training.memory import estimate_memory

    candidates = [c for c in compatible_micro_batches(recipe.train.batch_size, world) if c <= 2 * estimated]
    micro = probe_micro_batch(accelerator, model, step_loss, candidates, plan.optimizer_bytes)
    return micro, estimate_memory(
        accelerator.unwrap_model(model).config, recipe.train.optimizer, recipe.train.precision, micro, processes=world,
        strategy=recipe.train.strategy, device=str(accelerator.device), budget_bytes=plan.budget_bytes,
    )


def cap_cuda_memory(device: Any, budget_bytes: int) -> None:
    """Make train.max_memory a hard limit on CUDA: the caching allocator raises out-of-memory past it,
    so `auto` probing and training both stay inside the budget on a shared GPU."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), index)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or the CPU allocator's (a RuntimeError saying it can't allocate)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
