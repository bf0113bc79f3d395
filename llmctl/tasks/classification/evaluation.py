"""A classifier in `llmctl eval`: accuracy, precision, recall and F1 (per class, macro, weighted) and the
confusion matrix (eval.json, confusion.png) on its val split, another dataset dir or a labelled
CSV/JSONL; `--predict` labels new texts (predictions.jsonl); `--min-f1` / `--min-accuracy` gate.
`--compare` puts several classifiers side by side: accuracy, macro-F1, size and batch latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError
from llmctl.evaluation.gates import judge
from llmctl.evaluation.request import EvalOutcome, EvalRequest
from llmctl.evaluation.targets import warn_if_unverified
from llmctl.progress import Progress, silent_if_none

VIEW, COMPARE_VIEW = "classification", "classification-compare"  # the tables `llmctl eval` prints these in


def refuse_options(request: EvalRequest) -> None:
    """Refuse what a classifier's eval does not take: text to score (it needs labels), a perplexity gate,
    and in a compare the options of one classifier's eval."""
    if request.text:
        raise LlmctlError("--text scores language models; give a classifier labelled texts with --data FILE.")
    if request.max_ppl is not None:
        raise LlmctlError(f"--max-ppl: for language models; {request.paths[0]} is a classifier (gate it with --min-f1 "
                          "or --min-accuracy).")
    given = request.given({"--predict": request.predict, "--predictions": request.predictions, "--out": request.out,
                           "--min-f1": request.min_f1, "--min-accuracy": request.min_accuracy})
    if request.compare and given:
        raise LlmctlError(f"{', '.join(given)}: for one classifier's eval; --compare profiles several side by side.")


def evaluate(request: EvalRequest, progress: Progress | None = None) -> EvalOutcome:
    """Score a classifier and/or label new texts, writing eval.json, confusion.png and predictions.jsonl."""
    from llmctl.artifacts import write_json_atomic
    from llmctl.evaluation.profile import backend_name
    from llmctl.models.loading import load_for_inference
    from llmctl.tasks.classification.scoring import model_labels

    progress = silent_if_none(progress)
    path = request.paths[0]
    loaded = load_for_inference(path)
    warn_if_unverified(path, progress)
    out_dir = request.out or Path("reports") / "-".join(Path(path).resolve().parts[-3:])  # e.g. reports/runs-my-model
    report: dict[str, Any] = {"model_dir": str(path), "backend": backend_name(loaded), "labels": model_labels(loaded)}
    files: dict[str, str] = {}
    if request.predict is None or request.data is not None:
        files.update(_score(loaded, request, out_dir, report, progress))
    if request.predict is not None:
        files.update(_predict(loaded, request, out_dir, report, progress))
    report["files"] = files
    limits = {"min_f1": request.min_f1, "min_accuracy": request.min_accuracy}
    if "accuracy" in report:
        judge(report, limits, {"min_f1": report["macro"]["f1"], "min_accuracy": report["accuracy"]})
    elif any(limit is not None for limit in limits.values()):
        raise LlmctlError("--min-f1/--min-accuracy need labelled texts: the val split or --data, not --predict alone.")
    if "eval_json" in files:
        write_json_atomic(Path(files["eval_json"]), {k: v for k, v in report.items() if k != "files"})
    return EvalOutcome(report, VIEW)


def _score(loaded: Any, request: EvalRequest, out_dir: Path, report: dict[str, Any], progress: Progress) -> dict[str, str]:
    """The metrics of the labelled texts (into `report`) and the confusion PNG; the files it writes."""
    from llmctl.evaluation.classification import save_confusion_png
    from llmctl.evaluation.perplexity import dataset_of_model
    from llmctl.tasks.classification.scoring import evaluate_classifier, inputs_from_dataset, inputs_from_file

    data = request.data
    if data is not None and data.is_file():
        inputs = inputs_from_file(loaded, data, require_labels=True)
    else:
        dataset = data if data is not None else dataset_of_model(loaded.provenance, loaded.path).path
        inputs = inputs_from_dataset(loaded, dataset, request.split)
    metrics, _ = evaluate_classifier(loaded, inputs)
    report.update(metrics)
    _note_if_replacing([out_dir / "eval.json", out_dir / "confusion.png"], progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{'/'.join(Path(request.paths[0]).parts[-2:])}: {inputs.source.split('/')[-1]}"
    return {"confusion_png": str(save_confusion_png(metrics, out_dir / "confusion.png", title=title)),
            "eval_json": str(out_dir / "eval.json")}


def _predict(loaded: Any, request: EvalRequest, out_dir: Path, report: dict[str, Any], progress: Progress) -> dict[str, str]:
    """Label the texts of --predict into predictions.jsonl (scored too when they carry labels)."""
    from llmctl.evaluation.classification import prediction_row, write_predictions_jsonl
    from llmctl.tasks.classification.scoring import evaluate_classifier, inputs_from_file

    labels = report["labels"]
    new = inputs_from_file(loaded, request.predict, require_labels=False)
    scored, probs = evaluate_classifier(loaded, new)
    target = request.predictions or out_dir / "predictions.jsonl"
    _note_if_replacing([target], progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    truth = [labels[i] for i in new.labels] if new.labels is not None else [None] * len(probs)
    rows = (prediction_row(text, p, labels, t) for text, p, t in zip(new.texts or [], probs, truth))
    count = write_predictions_jsonl(target, rows)
    report["predicted"] = {"file": str(request.predict), "examples": count}
    if new.labels is not None:
        report["predicted"].update({k: scored[k] for k in ("accuracy", "macro") if k in scored})
    return {"predictions": str(target)}


def _note_if_replacing(paths: list[Path], progress: Progress) -> None:
    """An earlier eval's files are replaced, not kept: say which, and how to keep them."""
    from datetime import datetime

    for path in paths:
        if path.is_file():
            when = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
            progress.note(f"replacing {path} (written {when} by an earlier eval; --out DIR or --predictions FILE keeps it)")


def compare(request: EvalRequest, progress: Progress | None = None) -> EvalOutcome:
    """Accuracy, macro-F1, size and batch latency of several classifiers on the first one's val texts."""
    from llmctl.models.loading import load_for_inference
    from llmctl.tasks.classification.profile import profile_classifiers, val_inputs_of

    progress = silent_if_none(progress)
    paths = request.paths
    loaded = [load_for_inference(path, spin_threads=False) for path in paths]  # timings side by side
    for path in paths:
        warn_if_unverified(path, progress)
    inputs, why = val_inputs_of(loaded[0], request.data, None)
    if inputs is None:
        raise LlmctlError(f"{paths[0]}: {why}")
    progress.note(f"profiling {len(loaded)} classifiers on {len(inputs.lengths):,} texts of {inputs.source}; "
                  "timings interleaved")
    rows = [p.to_dict() for p in profile_classifiers(loaded, inputs, [str(p) for p in paths], progress=progress)]
    return EvalOutcome({"source": inputs.source, "examples": int(len(inputs.lengths)), "rows": rows}, COMPARE_VIEW)
