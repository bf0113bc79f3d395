"""`llmctl eval`: loss, perplexity and bits per byte of a model dir, and sample generations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import choices, complete_model_or_export_dir
from llmctl.cli.output import print_json, reporting_errors, say_always
from llmctl.errors import EXIT_GATE_FAILED

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
        from llmctl.cli.eval_tables import print_outcome
        from llmctl.cli.progress import WorkProgress
        from llmctl.evaluation.evaluate import evaluate
        from llmctl.evaluation.request import EvalRequest, Sampling

        request = EvalRequest(
            paths=list(model_dirs), compare=compare, data=data, text=list(text or []), split=split,
            max_tokens=max_tokens, batch_size=batch_size, prompts=list(prompt or []),
            sampling=Sampling(max_new_tokens, temperature, top_k, top_p, seed), predict=predict,
            predictions=predictions, out=out, max_ppl=max_ppl, min_f1=min_f1, min_accuracy=min_accuracy,
        )
        with WorkProgress() as progress:
            outcome = evaluate(request, progress)
        if json_out:
            print_json(outcome.report)
        else:
            print_outcome(outcome)
        for failure in outcome.failures:  # said even under --quiet
            say_always(f"[red]gate failed:[/] {failure}")
        if outcome.failures:
            raise typer.Exit(EXIT_GATE_FAILED)
