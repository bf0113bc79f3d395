"""`llmctl eval`: loss, perplexity and bits per byte of a model dir, and sample generations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_model_dir
from llmctl.cli.output import out_console, print_json, reporting_errors, say
from llmctl.errors import EXIT_GATE_FAILED, LlmctlError

EPILOG = 'Example: llmctl eval runs/my/model --prompt "def fib(n):"'


def eval_cli(
    model_dir: Path = typer.Argument(..., help="Model dir (runs/<name>/model).", autocompletion=complete_model_dir),
    data: Optional[Path] = typer.Option(None, "--data", help="Score this dataset dir's split instead of the training one."),
    text: Optional[List[Path]] = typer.Option(None, "--text", help="Score these text/JSONL/CSV files (repeatable)."),
    split: str = typer.Option("val", "--split", help="Which split of the dataset dir: val or train."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Score at most this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Generate a continuation of this text (repeatable)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(50, "--top-k", min=1, help="Sample among the k likeliest tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", help="Exit 3 if perplexity is above this (a CI gate)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Score a model dir on its val split (or --data / --text) and print samples for --prompt."""
    with reporting_errors(json_out):
        if split not in {"val", "train"}:
            raise LlmctlError(f"--split: must be val or train, got {split!r}.")
        if data and text:
            raise LlmctlError("--data and --text contradict each other; choose one.")
        report = run_eval(model_dir, data, text or [], split, max_tokens, batch_size)
        samples = _samples(report.pop("_loaded"), prompt or [], max_new_tokens, temperature, top_k, top_p, seed)
        report["samples"] = samples
        if json_out:
            print_json(report)
        else:
            _print_report(report)
        if max_ppl is not None and report["perplexity"] > max_ppl:
            say(f"[red]gate failed:[/] perplexity {report['perplexity']:.3f} > --max-ppl {max_ppl}")
            raise typer.Exit(EXIT_GATE_FAILED)


def run_eval(model_dir: Path, data: Path | None, text: list[Path], split: str, max_tokens: int | None, batch_size: int) -> dict:
    from llmctl.artifacts import DatasetDir
    from llmctl.data.shards import TokenShards
    from llmctl.data.tokenizer import eot_id, token_byte_lengths
    from llmctl.evaluation.perplexity import check_same_tokenizer, dataset_of_model, encode_text_files, evaluate_tokens
    from llmctl.models.model_dir import load_model_dir

    for f in text:
        if not f.is_file():
            raise LlmctlError(f"--text {f}: no such file.")
    loaded = load_model_dir(model_dir)
    byte_lengths = token_byte_lengths(loaded.tokenizer)
    unigram = None
    if text:
        tokens = encode_text_files(text, loaded.tokenizer, eot_id(loaded.tokenizer))
        source = ", ".join(str(f) for f in text)
    else:
        dataset = DatasetDir(data) if data else dataset_of_model(loaded.provenance, loaded.path)
        check_same_tokenizer(dataset, loaded.path / "tokenizer.json")
        shards = TokenShards(dataset.path)
        tokens = shards.split(split)
        source = f"{dataset.path} ({split})"
        if split == "val" and max_tokens is None:
            unigram = (shards.meta.get("unigram") or {}).get("perplexity")
    result = evaluate_tokens(loaded.model, tokens, byte_lengths, source=source, batch_size=batch_size, max_tokens=max_tokens)
    result.unigram_perplexity = unigram
    return {**result.to_dict(), "model_dir": str(model_dir), "step": loaded.provenance.get("step"), "_loaded": loaded}


def _samples(loaded, prompts: list[str], max_new_tokens: int, temperature: float, top_k, top_p, seed: int) -> list[dict]:
    from llmctl.data.tokenizer import eot_id
    from llmctl.models.generation import SamplingParams, generate

    out = []
    eot = eot_id(loaded.tokenizer)
    for i, text in enumerate(prompts):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, stop_ids=[eot], seed=seed + i)
        new = generate(loaded.model, ids, params)
        out.append({"prompt": text, "completion": loaded.tokenizer.decode(new, skip_special_tokens=False), "tokens": len(new)})
    return out


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
    for s in report["samples"]:
        out_console.print(f"\n[bold]{escape(s['prompt'])}[/]{escape(s['completion'])}", soft_wrap=True)
