"""model.int8.onnx: ONNX Runtime dynamic int8 (int8 weights, activations quantized per call).

int8 logits differ from fp32 by ~1e-2, so the check is perplexity on real tokens, not equality.
Per-tensor and per-channel weight scales are both tried; the one closer to fp32 is kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.artifacts import ExportDir
from llmctl.progress import OnProgress, Progress, silent_if_none

INT8_CANDIDATES = ".int8-candidates"  # under the export dir being written; removed before it is moved into place


def quantize_int8(
    export_dir: Path,
    reference: Any,
    *,
    external_data: bool,
    eval_tokens: np.ndarray | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write `export_dir`/model.int8.onnx from its model.onnx and return its figures for export.json.

    `reference` is the fp32 torch model. With `eval_tokens` each candidate is judged by its
    perplexity over them (the one nearer fp32 wins); without, by its mean |logit - fp32 logit| on a seeded
    random prompt, and perplexity is recorded as not measured.
    """
    from llmctl.models.onnx_model import OnnxCausalLM

    layout = ExportDir(Path(export_dir))
    work = layout.path / INT8_CANDIDATES
    work.mkdir()
    progress = silent_if_none(progress)
    try:
        progress.stage("int8: preparing the graph (onnxruntime quant_pre_process)")
        prepared = prepare_for_int8(layout, work, external_data)
        vocab_size = reference.config.vocab_size
        reference_ppl = None
        if eval_tokens is not None:
            progress.stage(f"int8: perplexity of the fp32 model over {len(eval_tokens) - 1:,} tokens", unit="tokens")
            reference_ppl = _perplexity(reference, eval_tokens, vocab_size, progress.update)
        else:
            probe = torch.randint(0, vocab_size, (1, min(64, reference.context_length)),
                                  generator=torch.Generator().manual_seed(0))  # (1, T)
            with torch.no_grad():
                probe_logits = reference(probe)  # (1, T, V)

        candidates: dict[str, dict[str, Any]] = {}
        for scheme in ("per-tensor", "per-channel"):
            progress.stage(f"int8: quantizing ({scheme} weight scales)")
            model = OnnxCausalLM(layout.path, int8_candidate(layout, work, prepared, scheme, external_data))
            if reference_ppl is not None:
                progress.stage(f"int8: perplexity ({scheme})", unit="tokens")
                ppl = _perplexity(model, eval_tokens, vocab_size, progress.update)
                delta = ppl - reference_ppl
                candidates[scheme] = {"perplexity": ppl, "perplexity_delta": delta, "score": abs(delta)}
            else:
                err = float((model(probe) - probe_logits).abs().mean())
                candidates[scheme] = {"logits_mean_abs_diff": err, "score": err}
            del model  # let ONNX Runtime release the file before it moves

        chosen = min(candidates, key=lambda s: candidates[s]["score"])
        figures = keep_int8_candidate(layout, work, chosen)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["candidates"] = {s: {k: v for k, v in c.items() if k != "score"} for s, c in candidates.items()}
    if reference_ppl is not None:
        figures["perplexity"] = {
            "eval_tokens": int(len(eval_tokens)),
            "fp32": reference_ppl,
            "int8": candidates[chosen]["perplexity"],
            "delta": candidates[chosen]["perplexity_delta"],
            "relative_delta": candidates[chosen]["perplexity_delta"] / reference_ppl,
        }
    else:
        figures["perplexity"] = "not measured: no eval tokens were given"
    return figures


def _perplexity(model: Any, tokens: np.ndarray, vocab_size: int, on_progress: OnProgress) -> float:
    from llmctl.evaluation.perplexity import evaluate_tokens

    no_bytes = np.ones(vocab_size, dtype=np.int64)  # bits per byte is not wanted here, only perplexity
    return evaluate_tokens(model, tokens, no_bytes, source="export int8 check", batch_size=1,
                          on_progress=on_progress).perplexity


def prepare_for_int8(layout: Any, work: Path, external_data: bool) -> Path:
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


def int8_candidate(layout: Any, work: Path, prepared: Path, scheme: str, external_data: bool) -> str:
    """work/<scheme>/model.int8.onnx: `prepared` with dynamic int8 (QInt8) weights under `scheme`'s scales
    (per-tensor or per-channel); its path relative to the export dir, as the ONNX model classes open it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = work / scheme / layout.onnx_int8.name
    graph.parent.mkdir()
    quantize_dynamic(
        str(prepared), str(graph), weight_type=QuantType.QInt8, per_channel=scheme == "per-channel",
        use_external_data_format=external_data,
    )
    return str(graph.relative_to(layout.path))


def keep_int8_candidate(layout: Any, work: Path, chosen: str) -> dict[str, Any]:
    """Move the chosen candidate's int8 graph (work/<chosen>/) into the export dir; its file and size figures."""
    for f in (work / chosen).iterdir():
        shutil.move(str(f), layout.path / f.name)
    files = _graph_files(layout.onnx_int8)
    fp32_bytes = sum(f.stat().st_size for f in _graph_files(layout.onnx))
    int8_bytes = sum(f.stat().st_size for f in files)
    return {
        "file": layout.onnx_int8.name,
        "data_file": files[1].name if len(files) > 1 else None,
        "method": "onnxruntime.quantization quant_pre_process + quantize_dynamic (QInt8 weights)",
        "weight_scales": chosen,
        "bytes": int8_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": fp32_bytes / int8_bytes,
    }


def _graph_files(graph: Path) -> list[Path]:
    """A graph file and its external data file, if it has one."""
    data = graph.with_name(graph.name + ".data")
    return [graph, data] if data.is_file() else [graph]
