"""The skeleton of every ONNX export: a model dir -> an export dir holding one graph, verified against PyTorch.

A task's export module (`llmctl/tasks/<task>/export.py`) says what differs as an `OnnxExport`: the
module it traces and its example inputs, export.json's task part, the parity check, how an int8 graph
is judged, and what to print. `export_onnx_dir` does the rest, once for every task: refuse bad
arguments, take the fp32 model, write the graph, tokenizer, config and export.json into a staging dir,
run the parity check, add model.int8.onnx when asked, and move the directory into place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import onnx
import torch.nn as nn

from llmctl.artifacts import ExportDir, staged_dir, write_json_atomic
from llmctl.errors import LlmctlError
from llmctl.export.onnx_graph import MIN_OPSET, exporter_figures
from llmctl.export.report import ExportReport
from llmctl.export.source import float_model
from llmctl.export.verify import ParityResult
from llmctl.progress import Progress, silent_if_none

OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"  # how the ONNX models open the graph (recorded in export.json)


class OnnxExport(Protocol):
    """What one task's ONNX export does differently; `export_onnx_dir` calls it in this order."""

    task: str  # export.json's `task`: the task of the model dir exported
    figure_keys: tuple[str, ...]  # the export.json entries the report's figures repeat
    dequantized_from: str  # what a quantized model dir stores, for the parity reference ("int8 weights")

    def prepare(self, loaded: Any) -> None:
        """Refuse what this task cannot export, and read what its checks need, before any file is written."""

    def dequantize(self, model: nn.Module) -> nn.Module:
        """The float model a quantized model of this task stands for."""

    def trace(self, model: nn.Module, path: Path, *, opset: int, external_data_threshold: int) -> dict[str, Any]:
        """Write the graph of `model` to `path` (`onnx_graph.trace_to_onnx`); its figures."""

    def config(self, loaded: Any) -> dict[str, Any]:
        """The export dir's config.json."""

    def manifest(self, loaded: Any, model: nn.Module, graph_path: Path) -> dict[str, Any]:
        """export.json's task part (the graph's shape, labels, op counts)."""

    def verify(self, model: nn.Module, export_dir: Path, *, atol: float, rtol: float | None,
               progress: Progress) -> tuple[ParityResult, dict[str, Any]]:
        """Run the written graph beside `model`; the parity result and what export.json's verification adds."""

    def quantize_int8(self, export_dir: Path, model: nn.Module, *, external_data: bool,
                      progress: Progress) -> dict[str, Any]:
        """Write model.int8.onnx beside model.onnx, judged as this task judges a model; its figures."""

    def summary(self, report: ExportReport) -> list[str]:
        """The lines printed under the parity table."""


def export_onnx_dir(
    loaded: Any,
    out_dir: Path,
    export: OnnxExport,
    *,
    opset: int = 17,
    external_data_threshold: int = 2 * 1024**3,
    atol: float = 1e-4,
    rtol: float | None = None,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Export a loaded model dir to `out_dir` (model.onnx, export.json, ...) as `export` says, verified.

    Weights over `external_data_threshold` bytes (or near protobuf's 2 GiB, whatever the threshold)
    go to model.onnx.data. `quantize="int8"` also writes model.int8.onnx. An existing export dir at
    `out_dir` is replaced; any other non-empty directory is refused. A parity failure does not raise:
    the directory is written and the report (and export.json) say passed False, for the caller to exit
    3 on. Bad arguments raise LlmctlError before any work, a failed export LlmctlError with exit code 1;
    either way nothing is left under `out_dir`.
    """
    out_dir = Path(out_dir)
    quantize = None if quantize in (None, "none") else quantize
    check_export_request(out_dir, opset, quantize, atol, rtol)
    export.prepare(loaded)
    progress = silent_if_none(progress)
    model, source_quantization = float_model(loaded, export.dequantize)
    seconds: dict[str, float] = {}

    with staged_dir(out_dir, f"the export dir {out_dir}") as tmp:
        layout = ExportDir(tmp)
        progress.stage(f"exporting the graph (torch.onnx.export, dynamo, opset {opset})")
        start = time.perf_counter()
        graph = export.trace(model, layout.onnx, opset=opset, external_data_threshold=external_data_threshold)
        seconds["export"] = time.perf_counter() - start
        loaded.tokenizer.save(str(layout.tokenizer))
        write_json_atomic(layout.config, export.config(loaded))
        write_json_atomic(layout.provenance, loaded.provenance)
        manifest = _manifest(loaded, model, opset, graph, source_quantization, export, layout.onnx)
        write_json_atomic(layout.manifest, manifest)  # the ONNX model classes read it to open the graph below

        start = time.perf_counter()
        parity, verification = export.verify(model, tmp, atol=atol, rtol=rtol, progress=progress)
        seconds["verify"] = time.perf_counter() - start
        reference = "PyTorch fp32" + (f", dequantized from the model dir's {export.dequantized_from}"
                                      if source_quantization else "")
        manifest["verification"] = {"reference": reference, **verification, **parity.to_dict()}

        if quantize == "int8":
            start = time.perf_counter()
            manifest["int8"] = export.quantize_int8(tmp, model, external_data=graph["external_data"], progress=progress)
            manifest["files"]["int8"] = manifest["int8"]["file"]
            manifest["files"]["int8_data"] = manifest["int8"]["data_file"]
            seconds["int8"] = time.perf_counter() - start
        manifest["seconds"] = seconds
        write_json_atomic(layout.manifest, manifest)

    report = _report(out_dir, graph, manifest, parity, export.figure_keys)
    report.summary = export.summary(report)
    return report


def check_export_request(out_dir: Path, opset: int, quantize: str | None, atol: float, rtol: float | None) -> None:
    """Refuse an opset, --quantize, tolerance or output path no export takes, before any work."""
    if opset < MIN_OPSET:
        raise LlmctlError(f"--opset {opset}: the exported graph needs opset {MIN_OPSET} or newer.")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise LlmctlError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}.")
    if quantize not in (None, "int8"):
        raise LlmctlError(f"--quantize {quantize}: expected int8 (or none).")
    if not atol >= 0 or (rtol is not None and not rtol >= 0):
        raise LlmctlError(f"--atol {atol} / --rtol {rtol}: tolerances must be 0 or more.")
    if out_dir.is_file():
        raise LlmctlError(f"{out_dir}: is a file; the export writes a directory (model.onnx and more) there.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ExportDir(out_dir).is_export():
        raise LlmctlError(
            f"{out_dir}: exists and is not an export dir (no export.json); choose a new directory, "
            "as the export replaces the whole directory."
        )


def _manifest(loaded: Any, model: Any, opset: int, graph: dict[str, Any], source_quantization: Any,
              export: OnnxExport, graph_path: Path) -> dict[str, Any]:
    """export.json without the verification figures (added once they are measured)."""
    layout = ExportDir(Path("."))
    return {
        "format": "onnx",
        "task": export.task,
        "opset": opset,
        "exporter": exporter_figures(opset),
        "source": {
            "model_dir": str(Path(loaded.path).resolve()),
            "family": loaded.config.get("family", "gpt"),
            "step": loaded.provenance.get("step"),
        },
        "source_quantization": source_quantization,
        "parameters": model.num_parameters(),
        "weight_bytes": graph["weight_bytes"],
        "external_data": graph["external_data"],
        **export.manifest(loaded, model, graph_path),
        "inputs": graph["inputs"],
        "outputs": graph["outputs"],
        "files": {
            "model": layout.onnx.name,
            "model_data": graph["data_file"],
            "int8": None,
            "int8_data": None,
            "tokenizer": layout.tokenizer.name,
            "config": layout.config.name,
            "provenance": layout.provenance.name,
        },
        "runtime": {"providers": ["CPUExecutionProvider"], "graph_optimization_level": OPTIMIZATION_LEVEL},
    }


def _report(out_dir: Path, graph: dict[str, Any], manifest: dict[str, Any], parity: ParityResult,
            figure_keys: tuple[str, ...]) -> ExportReport:
    """The ExportReport of a finished export dir: its files, the manifest's `figure_keys` and the parity table."""
    final = ExportDir(out_dir)
    paths = {"dir": str(final.path), "model": str(final.onnx), "export_json": str(final.manifest)}
    if graph["external_data"]:
        paths["model_data"] = str(final.path / graph["data_file"])
    if "int8" in manifest.get("files", {}):
        paths["int8"] = str(final.onnx_int8)
        if manifest["files"]["int8_data"]:
            paths["int8_data"] = str(final.path / manifest["files"]["int8_data"])
    figures = {k: v for k, v in manifest.items() if k in figure_keys}
    figures["verification"] = {k: v for k, v in manifest["verification"].items() if k not in ("passed", "failure", "rows")}
    return ExportReport(parity.passed, parity.failure, [r.to_dict() for r in parity.rows], figures, paths)
