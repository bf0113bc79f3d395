"""`llmctl export` of a sequence classifier: a model dir -> an export dir holding one ONNX classifier graph.

The graph takes `input_ids` (batch, sequence) int64, right-padded, and `lengths` (batch,) int64 and
returns `logits` (batch, 1) for two classes, else (batch, num_classes) (see
llmctl/models/onnx_classifier.py). It is traced from the float model's padded path (packed
sequences do not trace) by `trace_to_onnx`, as the decoder export is: dynamo exporter, opset 18
rewritten to 17 when asked, onnx.checker. lstm and gru become ONNX LSTM / GRU nodes, the tanh rnn a
Scan, the gpt classifier MatMuls. ONNX Runtime then runs it beside PyTorch on the model's own val
texts (`verify_classifier_parity`) before the directory is moved into place.

`--quantize int8` also writes model.int8.onnx (ONNX Runtime dynamic int8: LSTM nodes become
DynamicQuantizeLSTM, MatMuls and Gemms with weights MatMulInteger; GRU and the tanh recurrence stay
float), judged by val accuracy and macro-F1 against the fp32 graph rather than by equality.
"""

from __future__ import annotations

import collections
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.artifacts import ExportDir, staged_dir, write_json_atomic
from llmctl.export.onnx_export import (
    EXPORTER_MIN_OPSET,
    OPTIMIZATION_LEVEL,
    ExportReport,
    check_common_request,
    export_report,
    fp32_model,
    trace_to_onnx,
)
from llmctl.export.onnx_quant import int8_candidate, keep_int8_candidate, prepare_for_int8
from llmctl.models.onnx_classifier import INPUTS, OUTPUT
from llmctl.progress import Progress, silent_if_none

PARITY_TEXTS = 128  # val texts run through both backends (batches of 1, 2, 5, 8, 16, 32, 64)
INT8_TEXTS = 2048  # val texts the int8 graph is scored on, at most
INT8_CANDIDATES = ".int8-candidates"  # under the export dir being written; removed before it is moved into place


def export_classifier_onnx(
    loaded: Any,
    out_dir: Path,
    *,
    opset: int = 17,
    external_data_threshold: int = 2 * 1024**3,
    atol: float = 1e-4,
    rtol: float | None = None,
    quantize: str | None = None,
    data: Path | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Export a loaded classifier model dir (float or int8) to `out_dir`, verified against PyTorch.

    Parity runs on the val texts of `data` (a classification dataset dir) or of the model's own
    dataset, else on seeded random texts of ragged lengths (export.json says which). A parity
    failure does not raise: the directory is written and the report says passed False, for the
    caller to exit 3 on. Bad arguments raise LlmctlError before any work; a failed export
    LlmctlError with exit code 1; either way nothing is left under `out_dir`.
    """
    out_dir = Path(out_dir)
    quantize = None if quantize in (None, "none") else quantize
    check_common_request(out_dir, opset, quantize, atol, rtol)
    progress = silent_if_none(progress)
    model, source_quantization = fp32_model(loaded)
    texts = _texts_of(loaded, data)
    seconds: dict[str, float] = {}

    with staged_dir(out_dir, f"the export dir {out_dir}") as tmp:
        layout = ExportDir(tmp)
        progress.stage(f"exporting the graph (torch.onnx.export, dynamo, opset {opset})")
        start = time.perf_counter()
        ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
        lengths = torch.tensor([3, 2])  # torch.export specialises sizes 0 and 1: trace with B and T above 1
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        graph = trace_to_onnx(
            model, (ids, lengths), layout.onnx, opset=opset,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "lengths": {0: batch}},
            input_names=list(INPUTS), output_names=[OUTPUT], external_data_threshold=external_data_threshold,
        )
        seconds["export"] = time.perf_counter() - start
        loaded.tokenizer.save(str(layout.tokenizer))
        write_json_atomic(layout.config, {k: v for k, v in loaded.config.items() if k != "quantization"})
        write_json_atomic(layout.provenance, loaded.provenance)
        manifest = _manifest(loaded, model, opset, graph, source_quantization, op_counts(layout.onnx))
        write_json_atomic(layout.manifest, manifest)  # OnnxClassifier reads it to open the graph below

        progress.stage(f"verifying against PyTorch ({texts['source']}: ragged lengths, batch sizes 1 to 64)", unit="batches")
        from llmctl.export.verify import verify_classifier_parity
        from llmctl.models.onnx_classifier import OnnxClassifier

        start = time.perf_counter()
        onnx_model = OnnxClassifier(tmp)
        parity = verify_classifier_parity(
            model, onnx_model, texts["ids"][:PARITY_TEXTS], texts["lengths"][:PARITY_TEXTS], atol=atol, rtol=rtol,
            on_progress=progress.update,
        )
        del onnx_model
        seconds["verify"] = time.perf_counter() - start
        reference = "PyTorch fp32" + (", dequantized from the model dir's int8 weights" if source_quantization else "")
        manifest["verification"] = {"reference": reference, "inputs": texts["source"], **parity.to_dict()}

        if quantize == "int8":
            start = time.perf_counter()
            manifest["int8"] = quantize_classifier_int8(tmp, texts, external_data=graph["external_data"], progress=progress)
            manifest["files"]["int8"] = manifest["int8"]["file"]
            manifest["files"]["int8_data"] = manifest["int8"]["data_file"]
            seconds["int8"] = time.perf_counter() - start
        manifest["seconds"] = seconds
        write_json_atomic(layout.manifest, manifest)

    return export_report(out_dir, graph, manifest, parity,
                         ("task", "labels", "opset", "parameters", "weight_bytes", "seconds", "int8"))


def _texts_of(loaded: Any, data: Path | None) -> dict[str, Any]:
    """Labelled val texts of `data` or of the model's own dataset ({ids, lengths, labels, source}), else
    seeded random texts of ragged lengths, without labels. A `data` that cannot be read is refused."""
    from llmctl.compression.classifier_pipeline import val_inputs_of

    inputs, missing = val_inputs_of(loaded, data, None)
    if inputs is not None:
        n = min(len(inputs.lengths), INT8_TEXTS)
        return {"ids": np.asarray(inputs.ids[:n]), "lengths": np.asarray(inputs.lengths[:n]),
                "labels": np.asarray(inputs.labels[:n]), "source": f"val texts of {inputs.source.removesuffix(' (val)')}"}
    cfg = loaded.config
    width = int(cfg.get("max_len") or min(int(cfg.get("context_length") or 32), 32))
    g = np.random.default_rng(0)
    n = PARITY_TEXTS
    lengths = np.concatenate(([width, 1], g.integers(1, width + 1, n - 2))).astype(np.int64)
    ids = g.integers(0, int(cfg["vocab_size"]), (n, width)).astype(np.int64)
    ids[np.arange(width)[None, :] >= lengths[:, None]] = int(cfg.get("pad_id") or 0)
    return {"ids": ids, "lengths": lengths, "labels": None, "source": f"random token ids ({missing})"}


def quantize_classifier_int8(
    export_dir: Path, texts: dict[str, Any], *, external_data: bool, progress: Progress | None = None
) -> dict[str, Any]:
    """Write `export_dir`/model.int8.onnx from its model.onnx (ONNX Runtime dynamic int8) and return its figures.

    Per-tensor and per-channel weight scales are both tried; the one with the higher val accuracy
    (then macro-F1, then agreement with the fp32 graph's predictions) is kept. Without labelled
    texts, agreement with fp32 alone decides and accuracy is recorded as not measured.
    """
    from llmctl.evaluation.classification import classification_metrics
    from llmctl.evaluation.classifier_eval import predict_probabilities
    from llmctl.models.onnx_classifier import OnnxClassifier

    layout = ExportDir(Path(export_dir))
    work = layout.path / INT8_CANDIDATES
    work.mkdir()
    progress = silent_if_none(progress)
    config = OnnxClassifier(layout.path).config
    labels = [str(x) for x in config.get("labels") or range(int(config["num_classes"]))]

    def score(model: Any) -> tuple[np.ndarray, dict[str, Any] | None]:
        predicted = predict_probabilities(model, texts["ids"], texts["lengths"]).argmax(axis=1)
        if texts["labels"] is None:
            return predicted, None
        m = classification_metrics(texts["labels"], predicted, labels)
        return predicted, {"accuracy": m["accuracy"], "macro_f1": m["macro"]["f1"]}

    try:
        progress.stage("int8: preparing the graph (onnxruntime quant_pre_process)")
        prepared = prepare_for_int8(layout, work, external_data)
        progress.stage(f"int8: scoring the fp32 graph on {len(texts['lengths']):,} texts")
        fp32_predicted, fp32_metrics = score(OnnxClassifier(layout.path))
        candidates: dict[str, dict[str, Any]] = {}
        for scheme in ("per-tensor", "per-channel"):
            progress.stage(f"int8: quantizing ({scheme} weight scales) and scoring")
            graph = int8_candidate(layout, work, prepared, scheme, external_data)
            predicted, metrics = score(OnnxClassifier(layout.path, graph))
            agreement = float((predicted == fp32_predicted).mean())
            candidates[scheme] = {**(metrics or {}), "agreement_with_fp32": agreement}

        def rank(s: str) -> tuple[float, float, float]:
            c = candidates[s]
            return c.get("accuracy", 0.0), c.get("macro_f1", 0.0), c["agreement_with_fp32"]

        chosen = max(candidates, key=rank)
        figures = keep_int8_candidate(layout, work, chosen)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures.update({
        "int8_ops": _int8_ops(layout.onnx_int8),
        "examples": int(len(texts["lengths"])),
        "agreement_with_fp32": candidates[chosen]["agreement_with_fp32"],
        "candidates": candidates,
    })
    if fp32_metrics is not None:
        chosen_metrics = candidates[chosen]
        figures["accuracy"] = {"fp32": fp32_metrics["accuracy"], "int8": chosen_metrics["accuracy"],
                               "delta": chosen_metrics["accuracy"] - fp32_metrics["accuracy"]}
        figures["macro_f1"] = {"fp32": fp32_metrics["macro_f1"], "int8": chosen_metrics["macro_f1"],
                               "delta": chosen_metrics["macro_f1"] - fp32_metrics["macro_f1"]}
    else:
        figures["accuracy"] = "not measured: no labelled val texts (the model's dataset dir is gone; pass --data)"
    return figures


def op_counts(graph_path: Path) -> dict[str, int]:
    """How many nodes of each op type a graph has, its subgraphs (a Scan's body) included."""
    import onnx

    from llmctl.export.onnx_export import _graphs

    counts: collections.Counter[str] = collections.Counter()
    for graph in _graphs(onnx.load(str(graph_path), load_external_data=False).graph):
        counts.update(n.op_type for n in graph.node)
    return dict(sorted(counts.items()))


def _int8_ops(graph_path: Path) -> dict[str, int]:
    """The integer and quantizing ops of an int8 graph, by type."""
    return {op: n for op, n in op_counts(graph_path).items() if "Integer" in op or "Quantize" in op}


def _manifest(loaded: Any, model: Any, opset: int, graph: dict[str, Any], source_quantization: Any,
              op_types: dict[str, int]) -> dict[str, Any]:
    """export.json without the verification figures (added once they are measured)."""
    import onnx
    import onnxruntime

    from llmctl.models.classifiers import num_outputs

    layout = ExportDir(Path("."))
    cfg = loaded.config
    n_out = num_outputs(int(cfg["num_classes"]))
    return {
        "format": "onnx",
        "task": "classification",
        "labels": cfg.get("labels"),
        "opset": opset,
        "exporter": {
            "method": "torch.onnx.export(dynamo=True)" + (", rewritten from opset 18" if opset < EXPORTER_MIN_OPSET else ""),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "source": {
            "model_dir": str(Path(loaded.path).resolve()),
            "family": cfg.get("family"),
            "step": loaded.provenance.get("step"),
        },
        "source_quantization": source_quantization,
        "parameters": model.num_parameters(),
        "weight_bytes": graph["weight_bytes"],
        "external_data": graph["external_data"],
        "classifier": {
            "family": cfg.get("family"),
            "num_classes": int(cfg["num_classes"]),
            "logits": n_out,
            "activation": "sigmoid" if n_out == 1 else "softmax",
            "max_len": cfg.get("max_len"),
            "pad_id": cfg.get("pad_id"),
            "vocab_size": cfg.get("vocab_size"),
        },
        "inputs": graph["inputs"],
        "outputs": graph["outputs"],
        "op_types": op_types,
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
