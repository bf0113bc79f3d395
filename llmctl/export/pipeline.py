"""`llmctl export`'s engine: a model dir -> an export dir, written by the model's task.

The task's export module (`llmctl/tasks/<task>/export.py`) writes the format the recipe's export section
names (an ONNX graph through `llmctl.export.onnx_export`, a Hugging Face dir through
`llmctl.export.hf_export`) and verifies it; this module checks the output path and loads the model.
"""

from __future__ import annotations

from pathlib import Path

from llmctl.artifacts import check_output_dir
from llmctl.config.schema import ExportConfig
from llmctl.export.report import ExportReport
from llmctl.progress import Progress


def export_model(model_dir: Path, out_dir: Path, options: ExportConfig, *, data: Path | None = None,
                 overwrite: bool = False, progress: Progress | None = None) -> ExportReport:
    """Export the model dir at `model_dir` to `out_dir` as `options` (the recipe's export section) say.

    `data`: a dataset dir whose val split judges the export (default: the model's own). A failed check
    does not raise: the report says passed False, for the caller to exit 3 on."""
    from llmctl.models.model_dir import load_model_dir
    from llmctl.tasks import task_of_config

    check_output_dir(out_dir, overwrite=overwrite, sources=[model_dir], marker="export.json")
    loaded = load_model_dir(model_dir)
    return task_of_config(loaded.config).export.export(loaded, Path(out_dir), options, data=data, progress=progress)
