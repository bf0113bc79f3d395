"""Writing a compressed model dir: staged beside the output, measured as written, moved into place whole.

Every task's compression ends the same way, inside `compression_staging`: the compressed model is saved
as a model dir (the source's tokenizer and usage settings, provenance saying where it came from and how,
config.json recording its task) and both models are loaded back as later commands will load them
(`save_and_reload`); the task measures them, and `publish_compressed` puts the report into the dir as
compression.json and moves it into place. A failure leaves nothing under the output name.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llmctl.artifacts import replace_dir_atomic, staging_dir, write_json_atomic
from llmctl.config.schema import CompressConfig
from llmctl.progress import Progress

COMPRESSION_JSON = "compression.json"


@contextmanager
def compression_staging(out_dir: Path) -> Iterator[Path]:
    """A work dir beside `out_dir` for everything compress writes (removed when the block ends)."""
    work = staging_dir(Path(out_dir))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_compressed(model: Any, loaded: Any, model_dir: Path, options: CompressConfig, dest: Path) -> None:
    """Write a compressed model as a model dir: the source's tokenizer and usage settings (chat template,
    labels), its task, and provenance that records where it came from and how it was compressed."""
    from llmctl.models.model_dir import carried_config, save_model_dir
    from llmctl.tasks import task_of_config

    provenance = {
        **loaded.provenance,
        "compressed_from": str(Path(model_dir).resolve()),
        "compression": options.model_dump(mode="json"),
    }
    save_model_dir(model, dest, tokenizer_path=loaded.path / "tokenizer.json", provenance=provenance,
                   extra_config=carried_config(loaded.config), task=task_of_config(loaded.config).name)


def save_and_reload(model: Any, loaded: Any, model_dir: Path, options: CompressConfig, work: Path,
                    progress: Progress) -> tuple[Any, Any]:
    """Save `model` as work/model and load it and the source back, as later commands will load them
    (what compress measures is what they run): (source, compressed)."""
    from llmctl.models.model_dir import load_model_dir

    progress.stage("writing the model dir")
    save_compressed(model, loaded, model_dir, options, work / "model")
    progress.stage("loading both models (the compressed one as written)")
    return load_model_dir(model_dir), load_model_dir(work / "model")


def publish_compressed(work: Path, out_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write `report` into work/model as compression.json and move that model dir into place at `out_dir`."""
    write_json_atomic(work / "model" / COMPRESSION_JSON, report)
    replace_dir_atomic(work / "model", Path(out_dir))
    return report
