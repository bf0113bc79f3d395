"""Opening an export dir's graph in ONNX Runtime: the session options, the session, and what the graph is.

Every ONNX-backed model (`OnnxCausalLM`, `OnnxClassifier`, and a future task's) opens its graph through
`open_export_graph`, which checks the export dir, reads its config.json and export.json, and says whether
the graph quantizes activations at run time (then a row's result depends on the rows batched with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.artifacts import ExportDir, read_json_artifact
from llmctl.errors import LlmctlError

# ONNX Runtime's dynamic int8 ops: they quantize each MatMul's activations with one scale per call.
ACTIVATION_QUANTIZING_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul")


def check_export_dir(path: Path, file: str = "model.onnx") -> ExportDir:
    """Refuse a directory that is not an export dir, or lacks the graph `file`, saying what to do."""
    layout = ExportDir(Path(path))
    if not layout.path.is_dir():
        raise LlmctlError(f"{layout.path}: no such export dir.")
    if not layout.is_export():
        raise LlmctlError(
            f"{layout.path}: not an export dir (no export.json); an export dir is what `llmctl export` writes."
        )
    if not (layout.path / file).is_file():
        hint = " (export with --quantize int8 to write it)" if file == layout.onnx_int8.name else ""
        raise LlmctlError(f"{layout.path}: no {file} in this export dir{hint}.")
    return layout


def session_options(spin_threads: bool = True) -> Any:
    """ONNX Runtime session options. `spin_threads=False` is for a process that runs other work beside
    ONNX Runtime: its worker threads then never busy-wait for the next run, and there are no more of
    them than the cores this process may use (ONNX Runtime sizes its pool from the machine's cores,
    whatever the process's CPU affinity).

    Spinning threads take the cores the other work needs: a torch model timed next in the same process
    ran 2.6 -> 7 ms on 2 cores (tiny-gpt, forward at 1 x 128), and `llmctl serve` over 16 clients gave
    fewer tokens/s than over one, its HTTP thread and the engine thread's Python between steps starved
    by threads spinning while they waited (bench_serve; see BENCHMARKS.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's default optimization level. On a 124M model (2 cores) BASIC, EXTENDED, ALL, a saved
    # pre-optimized graph, onnxruntime.transformers fusions and intra_op_num_threads=2 all ran
    # within noise of each other (one run: prefill 90-94 ms, decode 10.6-11.3 ms), so the plain graph ships.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin_threads:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        usable = usable_cores()
        if usable < (os.cpu_count() or usable):
            options.intra_op_num_threads = usable
    return options


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or all of them where that is unknown."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def open_session(graph_path: Path, providers: list[str] | None = None, spin_threads: bool = True) -> Any:
    """An ONNX Runtime session over `graph_path` (CPU unless `providers` say otherwise)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(graph_path), session_options(spin_threads),
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise LlmctlError(f"{graph_path}: ONNX Runtime cannot open it ({e}).") from None


def quantizes_activations(graph_path: Path) -> bool:
    """Whether the graph quantizes activations at run time (ONNX Runtime's dynamic int8 ops)."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    return any(node.op_type in ACTIVATION_QUANTIZING_OPS for node in graph.node)


@dataclass
class ExportGraph:
    """An export dir's graph opened in ONNX Runtime, with what the model around it needs to know."""

    layout: ExportDir
    graph_path: Path
    config: dict[str, Any]  # the model's config.json, without format_version
    parameters: int  # of the exported model, as export.json records them
    session: Any
    batch_invariant: bool  # False when the graph quantizes activations: a row's result depends on its batch


def open_export_graph(export_dir: Path, file: str = "model.onnx", providers: list[str] | None = None,
                      spin_threads: bool = True) -> ExportGraph:
    """Open the graph `file` of the export dir at `export_dir` (`spin_threads`: see `session_options`)."""
    layout = check_export_dir(export_dir, file)
    manifest = read_json_artifact(layout.manifest, "export dir")
    config = read_json_artifact(layout.config, "export dir")
    config.pop("format_version", None)
    graph_path = layout.path / file
    session = open_session(graph_path, providers, spin_threads)
    return ExportGraph(layout, graph_path, config, int(manifest.get("parameters") or 0), session,
                       not quantizes_activations(graph_path))


class OrtModel:
    """What every ONNX-backed model shares: its opened graph, its config, CPU as its device, and the torch
    model's `eval()` and `num_parameters()`. Subclasses add the call their task's graph takes."""

    def __init__(self, graph: ExportGraph):
        import torch

        self.config: dict[str, Any] = graph.config
        self.graph_path = graph.graph_path
        self.session = graph.session
        self.batch_invariant = graph.batch_invariant
        self.device = torch.device("cpu")
        self._parameters = graph.parameters

    def eval(self) -> "OrtModel":
        return self

    def num_parameters(self) -> int:
        """Parameters of the exported model (a tied head counted once), as export.json records."""
        return self._parameters
