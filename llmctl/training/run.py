"""`llmctl train` as functions Python callers and the CLI share: `train_run` prepares the recipe's dataset
then trains it in this process, `launch_run` prepares it once then trains in several processes started by
`accelerate launch`, and `memory_plan` is what `--plan` prints.

Preparing is a callable the caller hands in (`prepare(recipe)`): the CLI's draws progress and says what
the dataset dir holds, the default prepares quietly, and a caller whose dataset is prepared already (a
tuning trial: the study prepared it once) passes None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llmctl.config.schema import Recipe
from llmctl.errors import LlmctlError
from llmctl.training.trainer import TrainCallbacks, TrainResult, train

Prepare = Callable[[Recipe], Any]


def prepare_quietly(recipe: Recipe) -> Any:
    """Prepare the recipe's dataset dir (kept when its inputs are unchanged), showing nothing."""
    from llmctl.data.prepare import prepare_dataset

    return prepare_dataset(recipe.data, recipe.data_dir(), seed=recipe.run.seed)


def check_run(recipe: Recipe, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """What is refused before any work, preparing included: the run dir rules and the trackers."""
    from llmctl.training.run_checks import check_run_dir
    from llmctl.training.trackers import check_trackers

    check_run_dir(run_dir, resume=resume, overwrite=overwrite, recipe=recipe)
    check_trackers(recipe.train.log_with)  # before preparing a data set the run would then refuse


def train_run(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: TrainCallbacks | None = None,
    prepare: Prepare | None = prepare_quietly,
) -> TrainResult:
    """Prepare the recipe's dataset with `prepare` (None: it is prepared already), then train it into `run_dir`."""
    check_run(recipe, Path(run_dir), resume=resume, overwrite=overwrite)
    if prepare is not None:
        prepare(recipe)
    return train(recipe, Path(run_dir), resume=resume, overwrite=overwrite, callbacks=callbacks)


def launch_run(
    recipe: Recipe,
    recipe_path: Path,
    overrides: list[str],
    run_dir: Path | None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    nproc: int | None = None,
    accelerate_config: Path | None = None,
    devices: list[int] | None = None,
    json_out: bool = False,
    prepare: Prepare | None = prepare_quietly,
    on_message: Callable[[str], None] = lambda text: None,
) -> int:
    """Prepare once here, then run `llmctl train RECIPE_PATH OVERRIDES` in every process through
    `accelerate launch`; returns the launcher's exit status."""
    from llmctl.training.launch import check_accelerate_config, launch_command, run_launched
    from llmctl.training.run_checks import check_batch_split

    check_run(recipe, run_dir or Path("runs") / recipe.name, resume=resume, overwrite=overwrite)
    processes = check_accelerate_config(accelerate_config) if accelerate_config is not None else None
    if devices is not None and nproc is not None and nproc > len(devices):
        raise LlmctlError(f"--nproc {nproc} needs {nproc} GPUs, but --devices names {len(devices)}.")
    check_batch_split(recipe.train, nproc or processes or 1)  # once, here, not in every worker
    if prepare is not None:
        prepare(recipe)
    args = [str(recipe_path), *overrides]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    args += ["--resume"] * resume + ["--overwrite"] * overwrite + ["--json"] * json_out
    cmd = launch_command(args, nproc=nproc, accelerate_config=accelerate_config, fsdp=recipe.train.strategy == "fsdp")
    on_message(f"launching {nproc or 'the configured number of'} processes through accelerate launch")
    return run_launched(cmd, devices)


def memory_plan(recipe: Recipe, processes: int) -> tuple[int, Any]:
    """The micro-batch `processes` processes would train with and its memory plan (None for a task whose
    models the planner does not cover), on this machine's first GPU or its CPU."""
    from accelerate import PartialState

    from llmctl.training.micro_batch import resolve_micro_batch

    device = "cuda:0" if PartialState().device.type == "cuda" else "cpu"
    return resolve_micro_batch(recipe, processes, device, _planned_vocab(recipe))


def _planned_vocab(recipe: Recipe) -> int:
    """The vocabulary the run will have: the prepared dataset's, a reused tokenizer's, or data.vocab_size."""
    from llmctl.artifacts import DatasetDir

    dataset = DatasetDir(recipe.data_dir())
    if dataset.exists():
        return int(dataset.read_meta()["vocab_size"])
    if recipe.data.tokenizer:
        from llmctl.data.tokenizer import load_tokenizer

        return load_tokenizer(Path(recipe.data.tokenizer)).get_vocab_size()
    return recipe.data.vocab_size
