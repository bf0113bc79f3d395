"""Parity of an exported classifier graph with the torch classifier it came from.

A classifier graph has no cache: `verify_classifier_parity` runs batches of real texts of several
sizes and ragged lengths through both and compares the logits and the predicted labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmctl.export.verify import ParityResult, Tally, parity_failure
from llmctl.progress import OnProgress

CLASSIFIER_BATCHES = (1, 2, 5, 8, 16, 32, 64)  # texts per parity batch, in turn, until the texts run out


def verify_classifier_parity(
    torch_model: Any,
    onnx_model: Any,
    ids: np.ndarray,
    lengths: np.ndarray,
    *,
    atol: float = 1e-4,
    rtol: float | None = None,
    batch_sizes: tuple[int, ...] = CLASSIFIER_BATCHES,
    on_progress: OnProgress | None = None,
) -> ParityResult:
    """Run both classifiers (`model(ids, lengths) -> logits`) on the same texts; fail on a logit
    difference above atol (+ rtol·|torch|) or on any predicted label that differs.

    `ids` (N, W) right-padded and `lengths` (N,) are cut into consecutive batches of `batch_sizes`
    texts, each cut to its longest text (so batches have ragged lengths and different widths); the
    last batch runs once more padded to the full width W + 3, to catch a graph that reads padding.
    """
    from llmctl.models.classifiers import predict

    logits_row = Tally("logits")
    failures: list[str] = []
    labels: dict[str, Any] = {"compared": 0, "identical": True, "first_difference": None}
    sizes, start, batches = [], 0, []
    for size in batch_sizes:
        if start >= len(lengths):
            break
        n = torch.as_tensor(np.asarray(lengths[start : start + size], dtype=np.int64))  # (B,)
        width = max(int(n.max()), 1)
        x = torch.as_tensor(np.asarray(ids[start : start + size, :width], dtype=np.int64))  # (B, width)
        batches.append((f"texts {start}-{start + len(n) - 1} (B={len(n)}, T={width})", x, n))
        sizes.append(len(n))
        start += len(n)
    if batches:
        _, x, n = batches[-1]
        pad = np.asarray(ids[start - len(n) : start], dtype=np.int64)  # (B, W), the stored padding
        wide = torch.cat((torch.as_tensor(pad), torch.as_tensor(pad[:, -1:]).expand(-1, 3)), dim=1)  # (B, W + 3)
        wide = wide[:, : getattr(torch_model, "context_length", wide.shape[1])]  # a transformer reads at most its context
        if wide.shape[1] > x.shape[1]:
            batches.append((f"the last batch padded to T={wide.shape[1]}", wide, n))  # the same texts: not counted again

    for i, (where, x, n) in enumerate(batches):
        with torch.no_grad():
            ref = torch_model(x, n)
        try:
            got = onnx_model(x, n)
        except Exception as e:  # onnxruntime's own error types: a graph that cannot take these sizes
            failures.append(f"ONNX Runtime cannot run {where} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        if on_progress is not None:
            on_progress(i + 1, len(batches))
        problem = logits_row.add("logits", where, got, ref, atol, rtol)
        if problem:
            failures.append(problem)
        p_ref, p_got = predict(ref), predict(got)
        labels["compared"] += len(n) if i < len(sizes) else 0
        differ = (p_ref != p_got).nonzero().flatten().tolist()
        if differ and labels["identical"]:
            b = differ[0]
            labels["identical"] = False
            labels["first_difference"] = f"{where}, row {b}: PyTorch predicts class {int(p_ref[b])}, ONNX Runtime {int(p_got[b])}"

    failure = parity_failure(failures, atol, rtol,
                             None if labels["identical"] else f"predicted labels differ: {labels['first_difference']}")
    figures = {"atol": atol, "rtol": rtol, "examples": int(sum(sizes)), "batch_sizes": sizes, "predictions": labels}
    return ParityResult(failure is None, failure, [logits_row.row], figures)
