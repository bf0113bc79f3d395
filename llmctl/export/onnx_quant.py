"""model.int8.onnx: ONNX Runtime dynamic int8 (int8 weights, activations quantized per call).

int8 results differ from fp32 (a decoder's logits by ~1e-2), so a task judges the int8 graph as it
judges a model (perplexity, accuracy), not by equality. Per-tensor and per-channel weight scales are
both tried: inside `int8_candidates` the task writes each candidate with `make`, scores it as it
likes, and `keep`s the better one; the candidates' work dir goes when the block ends.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llmctl.artifacts import ExportDir
from llmctl.export.onnx_graph import op_counts
from llmctl.progress import Progress

INT8_CANDIDATES = ".int8-candidates"  # under the export dir being written; removed before it is moved into place
WEIGHT_SCALES = ("per-tensor", "per-channel")  # the candidates tried, in this order


@dataclass
class Int8Candidates:
    """The int8 graphs tried for an export dir: its model.onnx prepared once, one candidate per scheme."""

    layout: ExportDir
    work: Path
    prepared: Path
    external_data: bool

    def make(self, scheme: str) -> str:
        """work/<scheme>/model.int8.onnx: the prepared graph with dynamic int8 (QInt8) weights under
        `scheme`'s scales (per-tensor or per-channel); its path relative to the export dir, as the ONNX
        model classes open it."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = self.work / scheme / self.layout.onnx_int8.name
        graph.parent.mkdir()
        quantize_dynamic(
            str(self.prepared), str(graph), weight_type=QuantType.QInt8, per_channel=scheme == "per-channel",
            use_external_data_format=self.external_data,
        )
        return str(graph.relative_to(self.layout.path))

    def keep(self, chosen: str) -> dict[str, Any]:
        """Move the chosen candidate's int8 graph (work/<chosen>/) into the export dir; its file and size figures."""
        for f in (self.work / chosen).iterdir():
            shutil.move(str(f), self.layout.path / f.name)
        files = graph_files(self.layout.onnx_int8)
        fp32_bytes = sum(f.stat().st_size for f in graph_files(self.layout.onnx))
        int8_bytes = sum(f.stat().st_size for f in files)
        return {
            "file": self.layout.onnx_int8.name,
            "data_file": files[1].name if len(files) > 1 else None,
            "method": "onnxruntime.quantization quant_pre_process + quantize_dynamic (QInt8 weights)",
            "weight_scales": chosen,
            "bytes": int8_bytes,
            "fp32_bytes": fp32_bytes,
            "size_ratio": fp32_bytes / int8_bytes,
        }


@contextmanager
def int8_candidates(export_dir: Path, *, external_data: bool, progress: Progress) -> Iterator[Int8Candidates]:
    """The export dir's model.onnx through onnxruntime's quant_pre_process, ready for `make`; the work dir
    under the export dir is removed when the block ends, whatever happens."""
    layout = ExportDir(Path(export_dir))
    work = layout.path / INT8_CANDIDATES
    work.mkdir()
    try:
        progress.stage("int8: preparing the graph (onnxruntime quant_pre_process)")
        yield Int8Candidates(layout, work, _prepare(layout, work, external_data), external_data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(layout: ExportDir, work: Path, external_data: bool) -> Path:
    """work/prepared.onnx: the export dir's model.onnx through onnxruntime's quant_pre_process."""
    from onnxruntime.quantization import quant_pre_process

    prepared = work / "prepared.onnx"
    # Symbolic shape inference gives up on the decoder graph's shape arithmetic; ONNX's own shape
    # inference, which still runs, types every MatMul weight, which is all dynamic int8 needs.
    quant_pre_process(
        str(layout.onnx), str(prepared), skip_symbolic_shape=True,
        save_as_external_data=external_data, all_tensors_to_one_file=True,
        external_data_location=prepared.name + ".data",
    )
    return prepared


def int8_ops(graph_path: Path) -> dict[str, int]:
    """The integer and quantizing ops of an int8 graph, by type."""
    return {op: n for op, n in op_counts(graph_path).items() if "Integer" in op or "Quantize" in op}


def graph_files(graph: Path) -> list[Path]:
    """A graph file and its external data file, if it has one."""
    data = graph.with_name(graph.name + ".data")
    return [graph, data] if data.is_file() else [graph]
