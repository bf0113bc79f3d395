"""An exported decoder run by ONNX Runtime, called like the torch `gpt` model.

The graph's inputs and outputs follow HF Optimum's names: `input_ids` (B, T), `attention_mask`
(B, P+T), `position_ids` (B, T), `past_key_values.{i}.key|value` (B, n_kv_head, P, head_size) in;
`logits` (B, T, V) and `present.{i}.key|value` (B, n_kv_head, P+T, head_size) out. The first step
passes an empty past (P = 0); the same graph serves prefill, chunked prefill and decode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.artifacts import ExportDir, read_json_artifact
from llmctl.errors import LlmctlError
from llmctl.models.model_dir import LoadedModel

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def input_names(n_layer: int) -> list[str]:
    """The decoder graph's input names, in graph order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    """The decoder graph's output names, in graph order."""
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value"))]


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


class OnnxCausalLM:
    """ONNX Runtime behind the torch `gpt` call: `model(ids, past_key_values=, position_ids=, attention_mask=, use_cache=)`.

    Takes and returns torch CPU tensors; an absent cache, mask or positions is filled in as the torch
    model would (empty past, every key real, positions counting on from the past).
    """

    def __init__(self, export_dir: Path, file: str = "model.onnx", providers: list[str] | None = None,
                 spin_threads: bool = True):
        layout = check_export_dir(export_dir, file)
        manifest = read_json_artifact(layout.manifest, "export dir")
        self.config: dict[str, Any] = read_json_artifact(layout.config, "export dir")
        self.config.pop("format_version", None)
        self.graph_path = layout.path / file
        self.device = torch.device("cpu")
        self._parameters = int(manifest.get("parameters") or 0)

        self.session = open_session(self.graph_path, providers, spin_threads)
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layer = len(past) // 2
        # An int8 graph quantizes each MatMul's activations with one scale over the whole input, so a
        # row's result depends on the rows batched with it (see llmctl.serving.batch).
        self.batch_invariant = not _quantizes_activations(self.graph_path)
        _, self.n_kv_head, _, self.head_size = past[0].shape  # (B, n_kv_head, P, head_size)
        self._outputs = output_names(self.n_layer)

    @property
    def context_length(self) -> int:
        return int(self.config["context_length"])

    def eval(self) -> "OnnxCausalLM":
        return self

    def num_parameters(self) -> int:
        """Parameters of the exported model (a tied head counted once), as export.json records."""
        return self._parameters

    def __call__(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) for token ids (B, T); with use_cache also the new per-layer (k, v)."""
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.int64)
        if position_ids is None:
            position_ids = torch.arange(P, P + T).expand(B, T)
        feed = {
            "input_ids": _int64(input_ids),
            "attention_mask": _int64(attention_mask),
            "position_ids": _int64(position_ids),
        }
        empty = np.zeros((B, self.n_kv_head, 0, self.head_size), dtype=np.float32)  # (B, nkv, 0, hs)
        for i in range(self.n_layer):
            k, v = (_float32(t) for t in past_key_values[i]) if past_key_values else (empty, empty)
            feed[f"past_key_values.{i}.key"] = k
            feed[f"past_key_values.{i}.value"] = v
        outputs = self.session.run(self._outputs if use_cache else self._outputs[:1], feed)
        logits = torch.from_numpy(outputs[0])  # (B, T, V)
        if not use_cache:
            return logits
        presents = [
            (torch.from_numpy(outputs[1 + 2 * i]), torch.from_numpy(outputs[2 + 2 * i])) for i in range(self.n_layer)
        ]
        return logits, presents


def _int64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)


def _float32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


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
        usable = _usable_cores()
        if usable < (os.cpu_count() or usable):
            options.intra_op_num_threads = usable
    return options


def _usable_cores() -> int:
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


def load_export_dir(path: str | Path, file: str = "model.onnx", spin_threads: bool = True) -> LoadedModel:
    """Open an export dir for inference: the graph `file` in ONNX Runtime, its tokenizer, config and provenance.

    A classifier's export dir (export.json "task": "classification") gives an `OnnxClassifier`,
    any other an `OnnxCausalLM`; `spin_threads` as in `session_options`.
    """
    from tokenizers import Tokenizer

    layout = check_export_dir(Path(path), file)
    manifest = read_json_artifact(layout.manifest, "export dir")
    if manifest.get("task") == "classification":
        from llmctl.models.onnx_classifier import OnnxClassifier

        model: Any = OnnxClassifier(layout.path, file, spin_threads=spin_threads)
    else:
        model = OnnxCausalLM(layout.path, file, spin_threads=spin_threads)
    try:
        tokenizer = Tokenizer.from_file(str(layout.tokenizer))
    except Exception as e:  # tokenizers raises a bare Exception on a missing or bad file
        raise LlmctlError(f"{layout.tokenizer}: not a readable tokenizer ({e}).") from None
    provenance = read_json_artifact(layout.provenance, "export dir") if layout.provenance.is_file() else {}
    return LoadedModel(model, dict(model.config), tokenizer, provenance, layout.path)


def _quantizes_activations(graph_path: Path) -> bool:
    """Whether the graph quantizes activations at run time (ONNX Runtime's dynamic int8 ops)."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    return any(node.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul") for node in graph.node)
