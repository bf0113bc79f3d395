"""`llmctl eval`: loss, perplexity and bits per byte of a model dir, and sample generations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import choices, complete_model_or_export_dir
from llmctl.cli.output import add_disturbed_caption, out_console, print_json, reporting_errors, say, say_always, timed
from llmctl.errors import EXIT_GATE_FAILED, LlmctlError

EPILOG = (
    'Examples: llmctl eval runs/my/model --prompt "def fib(n):"  |  '
    "llmctl eval --compare runs/my/model out/my-int8 out/my-onnx"
)


def eval_cli(
    model_dirs: List[Path] = typer.Argument(
        ..., help="Model dir, compressed model dir or export dir (several with --compare).", autocompletion=complete_model_or_export_dir
    ),
    compare: bool = typer.Option(False, "--compare", help="Profile every dir given side by side: perplexity, size, latency, tokens/s."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="A dataset dir to score (its --split) instead of the model's own; a classifier also takes "
        "a labelled CSV or JSONL file.",
    ),
    text: Optional[List[Path]] = typer.Option(None, "--text", help="Score these text/JSONL/CSV files (repeatable)."),
    split: str = typer.Option("val", "--split", help="Which split of the dataset dir: val or train.",
                              autocompletion=choices("val", "train")),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Score at most this many tokens (--compare: 65536 unless given)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Generate a continuation of this text (repeatable)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(
        0.0, "--temperature", min=0.0, help="0: greedy, the likeliest token each step (the same text every run); above 0 "
        "samples, e.g. 0.8 with --top-k and --seed.",
    ),
    top_k: Optional[int] = typer.Option(50, "--top-k", min=1, help="When sampling: among the k likeliest tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="When sampling: nucleus mass."),
    seed: int = typer.Option(0, "--seed", help="When sampling: the seed of the first prompt (the next ones count up)."),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", help="Exit 3 if perplexity is above this (a CI gate)."),
    predict: Optional[Path] = typer.Option(
        None, "--predict", help="Classifiers: label the texts of this CSV/JSONL file; predictions with probabilities go to JSONL."
    ),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Classifiers: where --predict writes (default: OUT/predictions.jsonl)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Classifiers: folder for eval.json, confusion.png and predictions (default: reports/<model dir>)."
    ),
    min_f1: Optional[float] = typer.Option(None, "--min-f1", min=0.0, max=1.0, help="Classifiers: exit 3 if macro-F1 is below this (a CI gate)."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", min=0.0, max=1.0, help="Classifiers: exit 3 if accuracy is below this."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Score a model (torch or ONNX Runtime) on its val split (or --data / --text); --compare profiles several.

    For a classifier: accuracy, precision, recall and F1 (per class, macro, weighted) and the confusion
    matrix (a table and a PNG) on its val split, another dataset dir or a labelled CSV/JSONL (--data);
    --predict FILE labels new texts.
    """
    with reporting_errors(json_out):
        classifier_only = {"--predict": predict, "--predictions": predictions, "--out": out, "--min-f1": min_f1,
                           "--min-accuracy": min_accuracy}
        if not compare and len(model_dirs) == 1 and _is_classifier(model_dirs[0]):
            if text:
                raise LlmctlError("--text scores language models; give a classifier labelled texts with --data FILE.")
            code = run_classifier_eval(model_dirs[0], data, split, predict, predictions, out, min_f1, min_accuracy, json_out)
            if code:
                raise typer.Exit(code)
            return
        given = [name for name, value in classifier_only.items() if value is not None]
        if given:
            raise LlmctlError(f"{', '.join(given)}: for classifiers; {model_dirs[0]} is a language model.")
        if data and text:
            raise LlmctlError("--data and --text contradict each other; choose one.")
        if len(model_dirs) > 1 and not compare:
            raise LlmctlError(f"{len(model_dirs)} dirs given; pass --compare to profile several side by side.")
        if compare and all(_is_classifier(path) for path in model_dirs):
            report = run_classifier_compare(model_dirs, data)
            if json_out:
                print_json(report)
            else:
                out_console.print(classifier_compare_table(report))
            return
        if compare:
            report = run_compare(model_dirs, data, text or [], split, max_tokens or 65536)
            worst = max((r["perplexity"] for r in report["rows"] if r["perplexity"] is not None), default=None)
            failures = _ppl_gate(report, worst, max_ppl)
            if json_out:
                print_json(report)
            else:
                out_console.print(compare_table(report))
            _exit_if_failed(failures)
            return
        report = run_eval(model_dirs[0], data, text or [], split, max_tokens, batch_size)
        samples = _samples(report.pop("_loaded"), prompt or [], max_new_tokens, temperature, top_k, top_p, seed)
        report["samples"] = samples
        if samples:
            report["decoding"] = _decoding(temperature, top_k, top_p, seed)
        failures = _ppl_gate(report, report["perplexity"], max_ppl)
        if json_out:
            print_json(report)
        else:
            _print_report(report)
        _exit_if_failed(failures)


def _ppl_gate(report: dict, perplexity: float | None, max_ppl: float | None) -> list[str]:
    """Judge --max-ppl: records `gate` in the report (for --json) and returns what failed."""
    if max_ppl is None:
        return []
    failures = [f"perplexity {perplexity:.3f} > --max-ppl {max_ppl}"] if perplexity is not None and perplexity > max_ppl else []
    report["gate"] = {"max_ppl": max_ppl, "passed": not failures, "failures": failures}
    return failures


def _exit_if_failed(failures: list[str]) -> None:
    """Say each failed gate (even under --quiet) and exit 3."""
    for failure in failures:
        say_always(f"[red]gate failed:[/] {failure}")
    if failures:
        raise typer.Exit(EXIT_GATE_FAILED)


def _is_classifier(path: Path) -> bool:
    """Whether a model or export dir holds a classifier (its config.json names classes), read without torch."""
    import json

    from llmctl.artifacts import ExportDir, ModelDir
    from llmctl.models.loading import backend_of

    config = ExportDir(path).config if backend_of(path) == "onnxruntime" else ModelDir(path).config
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("num_classes") is not None
    except (OSError, ValueError, AttributeError):
        return False  # loading it will say what is wrong


def run_classifier_eval(model_dir: Path, data: Path | None, split: str, predict: Path | None, predictions: Path | None,
                        out: Path | None, min_f1: float | None, min_accuracy: float | None, json_out: bool) -> int:
    """Score a classifier and/or label new texts; returns the exit status (3: a gate failed)."""
    from llmctl.artifacts import write_json_atomic
    from llmctl.evaluation.classification import (
        confusion_table,
        per_class_table,
        prediction_row,
        save_confusion_png,
        write_predictions_jsonl,
    )
    from llmctl.evaluation.classifier_eval import evaluate_classifier, inputs_from_dataset, inputs_from_file, model_labels
    from llmctl.evaluation.perplexity import dataset_of_model
    from llmctl.evaluation.profile import backend_name
    from llmctl.models.loading import load_for_inference

    loaded = load_for_inference(model_dir)
    _warn_if_unverified(model_dir)
    labels = model_labels(loaded)
    out_dir = out or Path("reports") / "-".join(Path(model_dir).resolve().parts[-3:])  # e.g. reports/runs-my-model
    report: dict = {"model_dir": str(model_dir), "backend": backend_name(loaded), "labels": labels}
    files: dict[str, str] = {}
    if predict is None or data is not None:
        if data is not None and data.is_file():
            inputs = inputs_from_file(loaded, data, require_labels=True)
        else:
            dataset = data if data is not None else dataset_of_model(loaded.provenance, loaded.path).path
            inputs = inputs_from_dataset(loaded, dataset, split)
        metrics, _ = evaluate_classifier(loaded, inputs)
        report.update(metrics)
        _say_if_replacing([out_dir / "eval.json", out_dir / "confusion.png"])
        out_dir.mkdir(parents=True, exist_ok=True)
        files["confusion_png"] = str(save_confusion_png(metrics, out_dir / "confusion.png", title=f"{'/'.join(Path(model_dir).parts[-2:])}: {inputs.source.split('/')[-1]}"))
        files["eval_json"] = str(out_dir / "eval.json")
    if predict is not None:
        new = inputs_from_file(loaded, predict, require_labels=False)
        scored, probs = evaluate_classifier(loaded, new)
        target = predictions or out_dir / "predictions.jsonl"
        _say_if_replacing([target])
        target.parent.mkdir(parents=True, exist_ok=True)
        truth = [labels[i] for i in new.labels] if new.labels is not None else [None] * len(probs)
        rows = (prediction_row(text, p, labels, t) for text, p, t in zip(new.texts or [], probs, truth))
        count = write_predictions_jsonl(target, rows)
        files["predictions"] = str(target)
        report["predicted"] = {"file": str(predict), "examples": count}
        if new.labels is not None:
            report["predicted"].update({k: scored[k] for k in ("accuracy", "macro") if k in scored})
    report["files"] = files
    failures = []
    if "accuracy" in report:
        if min_f1 is not None and report["macro"]["f1"] < min_f1:
            failures.append(f"macro-F1 {report['macro']['f1']:.4f} < --min-f1 {min_f1}")
        if min_accuracy is not None and report["accuracy"] < min_accuracy:
            failures.append(f"accuracy {report['accuracy']:.4f} < --min-accuracy {min_accuracy}")
        if min_f1 is not None or min_accuracy is not None:
            report["gate"] = {"min_f1": min_f1, "min_accuracy": min_accuracy, "passed": not failures, "failures": failures}
    elif min_f1 is not None or min_accuracy is not None:
        raise LlmctlError("--min-f1/--min-accuracy need labelled texts: the val split or --data, not --predict alone.")
    if "eval_json" in files:
        write_json_atomic(Path(files["eval_json"]), {k: v for k, v in report.items() if k != "files"})
    if json_out:
        print_json(report)
    else:
        _print_classifier_report(report, per_class_table, confusion_table)
    for failure in failures:
        say_always(f"[red]gate failed:[/] {failure}")
    return EXIT_GATE_FAILED if failures else 0


def _say_if_replacing(paths: list[Path]) -> None:
    """An earlier eval's files are replaced, not kept: say which, and how to keep them."""
    from datetime import datetime

    for path in paths:
        if path.is_file():
            when = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
            say(f"[yellow]replacing[/] {path} (written {when} by an earlier eval; --out DIR or --predictions FILE keeps it)")


def run_classifier_compare(paths: list[Path], data: Path | None) -> dict:
    """Accuracy, macro-F1, size and batch latency of several classifiers on the first one's val texts."""
    from llmctl.compression.classifier_pipeline import profile_classifiers, val_inputs_of
    from llmctl.models.loading import load_for_inference

    loaded = [load_for_inference(path, spin_threads=False) for path in paths]  # timings side by side
    for path in paths:
        _warn_if_unverified(path)
    inputs, why = val_inputs_of(loaded[0], data, None)
    if inputs is None:
        raise LlmctlError(f"{paths[0]}: {why}")
    from llmctl.cli.progress import WorkProgress

    say(f"profiling {len(loaded)} classifiers on {len(inputs.lengths):,} texts of {inputs.source}; timings interleaved")
    with WorkProgress() as progress:
        rows = [p.to_dict() for p in profile_classifiers(loaded, inputs, [str(p) for p in paths], progress=progress)]
    return {"source": inputs.source, "examples": int(len(inputs.lengths)), "rows": rows}


def classifier_compare_table(report: dict):
    from rich.table import Table

    from llmctl.units import human_bytes

    table = Table(title=f"on {report['source']}, {report['examples']:,} texts", header_style="bold", box=None,
                  title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("backend", no_wrap=True)
    for col in ("accuracy", "macro-F1", "size", "forward ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        ms = "-" if r["forward_ms"] is None else f"{r['forward_ms']:.2f} ({r['forward_batch']}x{r['forward_tokens']})"
        table.add_row(r["name"], r["backend"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", human_bytes(r["size_bytes"]),
                      timed(ms, r))
    add_disturbed_caption(table, report["rows"])
    return table


def _print_classifier_report(report: dict, per_class_table, confusion_table) -> None:
    if "accuracy" in report:
        out_console.print(
            f"{report['model_dir']} ({report['backend']}) on {report['source']}: {report['examples']:,} examples, "
            f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro']['f1']:.4f}"
        )
        out_console.print(per_class_table(report))
        out_console.print(confusion_table(report))
    if "predicted" in report:
        p = report["predicted"]
        scored = f" (accuracy {p['accuracy']:.4f} against its labels)" if "accuracy" in p else ""
        out_console.print(f"labelled {p['examples']:,} texts of {p['file']}{scored}")
    for name, path in report["files"].items():
        say(f"wrote {path}")


def _eval_tokens(loaded, data: Path | None, text: list[Path], split: str) -> tuple:
    """(tokens, source, unigram perplexity or None) that a model is scored on."""
    from llmctl.artifacts import DatasetDir
    from llmctl.data.shards import TokenShards
    from llmctl.data.tokenizer import eot_id
    from llmctl.evaluation.perplexity import check_same_tokenizer, dataset_of_model, encode_text_files

    for f in text:
        if not f.is_file():
            raise LlmctlError(f"--text {f}: no such file.")
    if text:
        return encode_text_files(text, loaded.tokenizer, eot_id(loaded.tokenizer)), ", ".join(str(f) for f in text), None
    dataset = DatasetDir(data) if data else dataset_of_model(loaded.provenance, loaded.path)
    check_same_tokenizer(dataset, Path(loaded.path) / "tokenizer.json")
    shards = TokenShards(dataset.path)
    unigram = (shards.meta.get("unigram") or {}).get("perplexity") if split == "val" else None
    return shards.split(split), f"{dataset.path} ({split})", unigram


def run_compare(paths: list[Path], data: Path | None, text: list[Path], split: str, max_tokens: int) -> dict:
    """Profile each dir (each ONNX graph of an export dir) on the first one's tokens, in this process."""
    from llmctl.artifacts import ExportDir
    from llmctl.data.tokenizer import token_byte_lengths
    from llmctl.evaluation.profile import profile_models
    from llmctl.models.loading import backend_of, load_for_inference

    targets: list[tuple[Path, str | None]] = []
    for path in paths:
        if backend_of(path) == "onnxruntime":
            _warn_if_unverified(path)
            targets.append((path, "model.onnx"))
            if ExportDir(path).onnx_int8.is_file():
                targets.append((path, "model.int8.onnx"))
        else:
            targets.append((path, None))
    loaded, names, tokens, byte_lengths, source = [], [], None, None, None
    for path, graph in targets:
        model = load_for_inference(path, onnx_file=graph, spin_threads=False)  # timings side by side
        if tokens is None:
            tokens, source, _ = _eval_tokens(model, data, text, split)
            tokens = tokens[: max_tokens + 1]
            byte_lengths = token_byte_lengths(model.tokenizer)
        elif model.tokenizer.get_vocab() != loaded[0].tokenizer.get_vocab():
            raise LlmctlError(f"{path}: its tokenizer differs from {paths[0]}'s; --compare needs models that share one.")
        loaded.append(model)
        names.append(str(path))
    from llmctl.cli.progress import WorkProgress

    say(f"profiling {len(loaded)} models on {len(tokens) - 1:,} tokens; timings interleaved")
    with WorkProgress() as progress:
        rows = [p.to_dict() for p in profile_models(loaded, tokens, byte_lengths, names, progress=progress)]
    base = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_change_pct"] = 100 * (r["perplexity"] / base - 1) if base and r["perplexity"] else None
    return {"source": source, "tokens": int(len(tokens) - 1), "rows": rows}


def compare_table(report: dict):
    from rich.table import Table

    from llmctl.units import human_bytes

    table = Table(title=f"on {report['source']}, {report['tokens']:,} tokens", header_style="bold", box=None, title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("backend", no_wrap=True)
    for col in ("perplexity", "Δ%", "size", "forward ms", "gen tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        delta = r["perplexity_change_pct"]
        table.add_row(
            r["name"], r["backend"], f"{r['perplexity']:.3f}", "-" if delta is None else f"{delta:+.2f}",
            human_bytes(r["size_bytes"]), timed(f"{r['forward_ms']:.2f}", r), timed(f"{r['generate_tokens_per_s']:.0f}", r),
        )
    add_disturbed_caption(table, report["rows"])
    return table


def run_eval(model_dir: Path, data: Path | None, text: list[Path], split: str, max_tokens: int | None, batch_size: int) -> dict:
    from llmctl.data.tokenizer import token_byte_lengths
    from llmctl.evaluation.perplexity import evaluate_tokens
    from llmctl.evaluation.profile import backend_name
    from llmctl.models.loading import load_for_inference

    loaded = load_for_inference(model_dir)
    _warn_if_unverified(model_dir)
    tokens, source, unigram = _eval_tokens(loaded, data, text, split)
    if max_tokens is not None:
        unigram = None
    from llmctl.cli.progress import WorkProgress

    byte_lengths = token_byte_lengths(loaded.tokenizer)
    scored = min(len(tokens), max_tokens + 1 if max_tokens is not None else len(tokens)) - 1
    with WorkProgress() as progress:
        progress.stage(f"perplexity on {scored:,} tokens of {source}", unit="tokens")
        result = evaluate_tokens(loaded.model, tokens, byte_lengths, source=source, batch_size=batch_size,
                                 max_tokens=max_tokens, on_progress=progress.update)
    result.unigram_perplexity = unigram
    return {
        **result.to_dict(), "model_dir": str(model_dir), "backend": backend_name(loaded),
        "step": loaded.provenance.get("step"), "_loaded": loaded,
    }


def _warn_if_unverified(path: Path) -> None:
    """An export dir whose parity check failed still loads; say so before its figures are trusted."""
    import json

    from llmctl.artifacts import ExportDir

    layout = ExportDir(Path(path))
    if not layout.is_export():
        return
    try:
        verification = json.loads(layout.manifest.read_text(encoding="utf-8")).get("verification") or {}
    except (OSError, ValueError):
        return
    if verification.get("passed") is False:
        say(f"[yellow]warning:[/] {path} failed its parity check at export: {verification.get('failure')}")


def _samples(loaded, prompts: list[str], max_new_tokens: int, temperature: float, top_k, top_p, seed: int) -> list[dict]:
    from llmctl.data.tokenizer import eot_id
    from llmctl.models.generation import SamplingParams, generate

    if not prompts:
        return []
    out = []
    eot = eot_id(loaded.tokenizer)
    for i, text in enumerate(prompts):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, stop_ids=[eot], seed=seed + i)
        new = generate(loaded.model, ids, params)
        out.append({"prompt": text, "completion": loaded.tokenizer.decode(new, skip_special_tokens=False), "tokens": len(new)})
    return out


def _decoding(temperature: float, top_k: int | None, top_p: float | None, seed: int) -> dict:
    """How the samples were decoded, for the report and the line above them."""
    if temperature <= 0:
        return {"mode": "greedy", "temperature": 0.0}
    return {"mode": "sampled", "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}


def _decoding_line(decoding: dict) -> str:
    if decoding["mode"] == "greedy":
        return "samples: greedy (the likeliest token each step; --temperature 0.8 samples instead)"
    parts = [f"temperature {decoding['temperature']:g}"]
    parts += [f"top-k {decoding['top_k']}"] if decoding.get("top_k") else []
    parts += [f"top-p {decoding['top_p']:g}"] if decoding.get("top_p") else []
    return f"samples: sampled at {', '.join(parts)}, seed {decoding['seed']} (--temperature 0 for greedy)"


def _print_report(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report['model_dir']} on {report['source']}", box=None, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{report['loss']:.4f}")
    table.add_row("perplexity", f"{report['perplexity']:.3f}")
    table.add_row("bits per byte", f"{report['bits_per_byte']:.4f}")
    table.add_row("tokens scored", f"{report['tokens']:,}")
    if report.get("unigram_perplexity"):
        u = report["unigram_perplexity"]
        table.add_row("unigram perplexity", f"{u:.3f}")
        table.add_row("model / unigram", f"{report['perplexity'] / u:.3f}")
    out_console.print(table)
    if report["samples"]:
        say(_decoding_line(report["decoding"]))
    for s in report["samples"]:
        out_console.print(f"\n[bold]{escape(s['prompt'])}[/]{escape(s['completion'])}", soft_wrap=True)
