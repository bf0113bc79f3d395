"""`compress`: prune and/or quantize a model dir into a new one, and measure what it cost and saved.

`compress_model` checks what every compression needs (the input is a float model dir, the output a
new path, there is something to do), loads the model, and hands it to its task's compression module
(`llmctl/tasks/<task>/compression.py`: how that task prunes, quantizes, recovers and is judged), which
writes the result through `llmctl.compression.save`. The result is a model dir like any other (eval,
export and serve load it without flags) with a `compression.json` beside the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.artifacts import check_output_dir
from llmctl.config.schema import CompressConfig
from llmctl.errors import LlmctlError
from llmctl.progress import Progress, silent_if_none


def describe(options: CompressConfig) -> str:
    parts = []
    if options.prune:
        parts.append(f"{options.prune_method} pruning {options.prune:.0%}")
    if options.prune and options.recover_steps:
        parts.append(f"{options.recover_steps} recovery steps")
    if options.quantize != "none":
        parts.append(options.quantize)
    return ", ".join(parts) or "nothing"


def compress_model(
    model_dir: Path,
    out_dir: Path,
    options: CompressConfig,
    *,
    data: Path | None = None,
    overwrite: bool = False,
    measure_speed: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress the model dir at `model_dir` into `out_dir`; returns the report also written as compression.json.

    `progress` hears each stage, and how far quantizing and measuring are."""
    from llmctl.models.loading import require_model_dir
    from llmctl.models.model_dir import load_model_dir
    from llmctl.tasks import task_of_config

    progress = silent_if_none(progress)
    require_model_dir(model_dir, "compress")  # the path first: a typo is not "nothing to do"
    check_output_dir(out_dir, overwrite=overwrite, sources=[model_dir], marker="config.json")
    if options.prune == 0 and options.quantize == "none":
        raise LlmctlError("nothing to do: give --prune S (0 < S < 1) and/or --quantize (int8, int8-weight, int4-weight).")
    if options.recover_steps and not options.prune:
        raise LlmctlError("--recover-steps fine-tunes after pruning; give --prune too.")
    loaded = load_model_dir(model_dir)
    if loaded.config.get("quantization"):
        raise LlmctlError(
            f"{model_dir}: already quantized ({loaded.config['quantization'].get('scheme')}); compress the float model it came from."
        )
    return task_of_config(loaded.config).compression.compress(
        loaded, Path(model_dir), Path(out_dir), options, data=data, measure_speed=measure_speed, progress=progress
    )
