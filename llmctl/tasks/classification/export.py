"""`llmctl export` of a sequence classifier: a model dir -> an export dir holding one ONNX classifier graph.

The graph takes `input_ids` (batch, sequence) int64, right-padded, and `lengths` (batch,) int64 and
returns `logits` (batch, 1) for two classes, else (batch, num_classes) (see
llmctl/models/onnx_classifier.py). It is traced from the float model's padded path (packed
sequences do not trace) through the neutral skeleton (`llmctl.export.onnx_export`): dynamo exporter,
opset 18 rewritten to 17 when asked, onnx.checker. lstm and gru become ONNX LSTM / GRU nodes, the
tanh rnn a Scan, the gpt classifier MatMuls. ONNX Runtime then runs it beside PyTorch on the model's
own val texts (`llmctl.tasks.classification.parity`) before the directory is moved into place.

`--quantize int8` also writes model.int8.onnx (ONNX Runtime dynamic int8: LSTM nodes become
DynamicQuantizeLSTM, MatMuls and Gemms with weights MatMulInteger; GRU and the tanh recurrence stay
float), judged by val accuracy and macro-F1 against the fp32 graph rather than by equality.
There is no Hugging Face format for classifiers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from llmctl.config.schema import ExportConfig
from llmctl.errors import LlmctlError
from llmctl.export.onnx_export import export_onnx_dir
from llmctl.export.onnx_graph import op_counts, trace_to_onnx
from llmctl.export.onnx_quant import WEIGHT_SCALES, int8_candidates, int8_ops
from llmctl.export.report import ExportReport
from llmctl.export.verify import ParityResult
from llmctl.models.onnx_classifier import INPUTS, OUTPUT, OnnxClassifier
from llmctl.progress import Progress, silent_if_none

PARITY_TEXTS = 128  # val texts run through both backends (batches of 1, 2, 5, 8, 16, 32, 64)
INT8_TEXTS = 2048  # val texts the int8 graph is scored on, at most


def export(loaded: Any, out_dir: Path, options: ExportConfig, *, data: Path | None = None,
           progress: Progress | None = None) -> ExportReport:
    """The export `options` (the recipe's export section) asks for: the ONNX graph, judged on the val texts
    of `data` (a classification dataset dir) or of the model's own dataset. Format hf is refused."""
    if options.format == "hf":
        return export_hf(loaded, out_dir)
    return export_onnx(loaded, out_dir, opset=options.opset, atol=options.atol, quantize=options.quantize,
                       external_data_threshold=int(options.external_data_mb * 1e6), data=data, progress=progress)


def export_onnx(loaded: Any, out_dir: Path, *, opset: int = 17, external_data_threshold: int = 2 * 1024**3,
                atol: float = 1e-4, rtol: float | None = None, quantize: str | None = None,
                data: Path | None = None, progress: Progress | None = None) -> ExportReport:
    """Export a loaded classifier model dir (float or int8) to `out_dir`, verified against PyTorch.

    Parity runs on the val texts of `data` (a classification dataset dir) or of the model's own
    dataset, else on seeded random texts of ragged lengths (export.json says which); so does the int8
    graph's scoring. The rest (files, refusals, what a failure leaves) is
    `llmctl.export.onnx_export.export_onnx_dir`'s.
    """
    return export_onnx_dir(
        loaded, out_dir, ClassifierExport(data), opset=opset, external_data_threshold=external_data_threshold,
        atol=atol, rtol=rtol, quantize=quantize, progress=progress,
    )


def export_hf(loaded: Any, out_dir: Path, **_: Any) -> ExportReport:
    """Refused, naming the format that is: the Hugging Face export writes causal language models only."""
    raise LlmctlError(
        f"--format hf: {loaded.path} is a classifier; the Hugging Face export writes causal language models "
        "(LlamaForCausalLM) only. Export it with --format onnx."
    )


def open_onnx(export_dir: Path, file: str = "model.onnx", *, spin_threads: bool = True) -> OnnxClassifier:
    """The classifier graph `file` of an export dir in ONNX Runtime, called like the torch classifier."""
    return OnnxClassifier(export_dir, file, spin_threads=spin_threads)


class ClassifierExport:
    """The `OnnxExport` of a sequence classifier (see llmctl.export.onnx_export)."""

    task = "classification"
    figure_keys = ("task", "labels", "opset", "parameters", "weight_bytes", "seconds", "int8")
    dequantized_from = "int8 weights"

    def __init__(self, data: Path | None):
        self.data = data
        self.texts: dict[str, Any] = {}

    def prepare(self, loaded: Any) -> None:
        self.texts = texts_of(loaded, self.data)

    def dequantize(self, model: nn.Module) -> nn.Module:
        from llmctl.compression.classifier_quant import dequantize_classifier

        return dequantize_classifier(model)

    def trace(self, model: nn.Module, path: Path, *, opset: int, external_data_threshold: int) -> dict[str, Any]:
        ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
        lengths = torch.tensor([3, 2])  # torch.export specialises sizes 0 and 1: trace with B and T above 1
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        return trace_to_onnx(
            model, (ids, lengths), path, opset=opset,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "lengths": {0: batch}},
            input_names=list(INPUTS), output_names=[OUTPUT], external_data_threshold=external_data_threshold,
        )

    def config(self, loaded: Any) -> dict[str, Any]:
        return {k: v for k, v in loaded.config.items() if k != "quantization"}  # the graph is float

    def manifest(self, loaded: Any, model: nn.Module, graph_path: Path) -> dict[str, Any]:
        from llmctl.models.classifiers import num_outputs

        cfg = loaded.config
        n_out = num_outputs(int(cfg["num_classes"]))
        return {
            "labels": cfg.get("labels"),
            "classifier": {
                "family": cfg.get("family"),
                "num_classes": int(cfg["num_classes"]),
                "logits": n_out,
                "activation": "sigmoid" if n_out == 1 else "softmax",
                "max_len": cfg.get("max_len"),
                "pad_id": cfg.get("pad_id"),
                "vocab_size": cfg.get("vocab_size"),
            },
            "op_types": op_counts(graph_path),
        }

    def verify(self, model: nn.Module, export_dir: Path, *, atol: float, rtol: float | None,
               progress: Progress) -> tuple[ParityResult, dict[str, Any]]:
        from llmctl.tasks.classification.parity import verify_classifier_parity

        texts = self.texts
        progress.stage(f"verifying against PyTorch ({texts['source']}: ragged lengths, batch sizes 1 to 64)", unit="batches")
        onnx_model = OnnxClassifier(export_dir)
        parity = verify_classifier_parity(
            model, onnx_model, texts["ids"][:PARITY_TEXTS], texts["lengths"][:PARITY_TEXTS], atol=atol, rtol=rtol,
            on_progress=progress.update,
        )
        del onnx_model  # let ONNX Runtime release the file before the dir moves
        return parity, {"inputs": texts["source"]}

    def quantize_int8(self, export_dir: Path, model: nn.Module, *, external_data: bool,
                      progress: Progress) -> dict[str, Any]:
        return quantize_classifier_int8(export_dir, self.texts, external_data=external_data, progress=progress)

    def summary(self, report: ExportReport) -> list[str]:
        v = report.figures["verification"]
        p = v["predictions"]
        same = "identical" if p["identical"] else f"NOT identical ({p['first_difference']})"
        lines = [f"predicted labels {same} on {p['compared']:,} texts ({v['inputs']}; batch sizes "
                 f"{', '.join(map(str, v['batch_sizes']))})"]
        int8 = report.figures.get("int8")
        return [*lines, int8_line(int8)] if int8 else lines


def texts_of(loaded: Any, data: Path | None) -> dict[str, Any]:
    """Labelled val texts of `data` or of the model's own dataset ({ids, lengths, labels, source}), else
    seeded random texts of ragged lengths, without labels. A `data` that cannot be read is refused."""
    from llmctl.tasks.classification.profile import val_inputs_of

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
    from llmctl.tasks.classification.scoring import predict_probabilities

    progress = silent_if_none(progress)
    config = OnnxClassifier(Path(export_dir)).config
    labels = [str(x) for x in config.get("labels") or range(int(config["num_classes"]))]

    def score(model: Any) -> tuple[np.ndarray, dict[str, Any] | None]:
        predicted = predict_probabilities(model, texts["ids"], texts["lengths"]).argmax(axis=1)
        if texts["labels"] is None:
            return predicted, None
        m = classification_metrics(texts["labels"], predicted, labels)
        return predicted, {"accuracy": m["accuracy"], "macro_f1": m["macro"]["f1"]}

    with int8_candidates(export_dir, external_data=external_data, progress=progress) as candidates:
        progress.stage(f"int8: scoring the fp32 graph on {len(texts['lengths']):,} texts")
        fp32_predicted, fp32_metrics = score(OnnxClassifier(candidates.layout.path))
        scores: dict[str, dict[str, Any]] = {}
        for scheme in WEIGHT_SCALES:
            progress.stage(f"int8: quantizing ({scheme} weight scales) and scoring")
            predicted, metrics = score(OnnxClassifier(candidates.layout.path, candidates.make(scheme)))
            scores[scheme] = {**(metrics or {}), "agreement_with_fp32": float((predicted == fp32_predicted).mean())}

        def rank(s: str) -> tuple[float, float, float]:
            c = scores[s]
            return c.get("accuracy", 0.0), c.get("macro_f1", 0.0), c["agreement_with_fp32"]

        chosen = max(scores, key=rank)
        figures = candidates.keep(chosen)
    figures.update({
        "int8_ops": int8_ops(candidates.layout.onnx_int8),
        "examples": int(len(texts["lengths"])),
        "agreement_with_fp32": scores[chosen]["agreement_with_fp32"],
        "candidates": scores,
    })
    if fp32_metrics is not None:
        for key in ("accuracy", "macro_f1"):
            figures[key] = {"fp32": fp32_metrics[key], "int8": scores[chosen][key],
                            "delta": scores[chosen][key] - fp32_metrics[key]}
    else:
        figures["accuracy"] = "not measured: no labelled val texts (the model's dataset dir is gone; pass --data)"
    return figures


def int8_line(int8: dict[str, Any]) -> str:
    """The int8 graph's size, accuracy and agreement with fp32, as one line for people."""
    text = f"int8: {int8['file']} is {1 / int8['size_ratio']:.2f}x the fp32 size ({int8['weight_scales']} scales)"
    acc, f1 = int8.get("accuracy"), int8.get("macro_f1")
    if isinstance(acc, dict):
        text += (f"; val accuracy {acc['fp32']:.4f} -> {acc['int8']:.4f}, macro-F1 {f1['fp32']:.4f} -> {f1['int8']:.4f}"
                 f" on {int8['examples']:,} texts")
    else:
        text += f"; accuracy {acc}"
    return text + f"; predictions agree with fp32 on {100 * int8['agreement_with_fp32']:.2f}%"
