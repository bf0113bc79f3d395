"""The `prepare` engine: the recipe's data section -> a dataset dir, written by the data module of the
recipe's task (`llmctl.tasks.<task>.data`) through the shared skeleton in data.dataset_builder."""

from __future__ import annotations

from pathlib import Path

from llmctl.config.schema import DataConfig
from llmctl.data.dataset_builder import Progress, PrepareResult
from llmctl.tasks import task_named


def prepare_dataset(
    data: DataConfig,
    out_dir: Path,
    *,
    seed: int,
    force: bool = False,
    on_progress: Progress | None = None,
    init_from: str | None = None,
) -> PrepareResult:
    """Build the dataset dir `out_dir` from `data`, or keep it when its fingerprint is already current.

    `on_progress(stage, done, total)` reports "tokenizer" (bytes read) and "encode" (bytes encoded).
    `init_from` (the recipe's model.init_from) lends instruction data its tokenizer and chat template
    when the data section names none.
    """
    return task_named(data.task).data.prepare(data, Path(out_dir), seed=seed, force=force, on_progress=on_progress,
                                              init_from=init_from)
