"""`llmctl eval`: loss, perplexity and bits per byte of a model dir, and sample generations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cli.completion import complete_model_dir
from llmctl.cli.output import out_console, print_json, reporting_errors, say
from llmctl.errors import EXIT_GATE_FAILED, LlmctlError

EPILOG = (
    'Examples: llmctl eval runs/my/model --prompt "def fib(n):"  |  '
    "llmctl eval --compare runs/my/model out/my-int8 out/my-onnx"
)


def eval_cli(
    model_dirs: List[Path] = typer.Argument(
        ..., help="Model dir, compressed model dir or export dir (several with --compare).", autocompletion=complete_model_dir
    ),
    compare: bool = typer.Option(False, "--compare", help="Profile every dir given side by side: perplexity, size, latency, tokens/s."),
    data: Optional[Path] = typer.Option(None, "--data", help="Score this dataset dir's split instead of the training one."),
    text: Optional[List[Path]] = typer.Option(None, "--text", help="Score these text/JSONL/CSV files (repeatable)."),
    split: str = typer.Option("val", "--split", help="Which split of the dataset dir: val or train."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Score at most this many tokens (--compare: 65536 unless given)."),
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
    """Score a model (torch or ONNX Runtime) on its val split (or --data / --text); --compare profiles several."""
    with reporting_errors(json_out):
        if split not in {"val", "train"}:
            raise LlmctlError(f"--split: must be val or train, got {split!r}.")
        if data and text:
            raise LlmctlError("--data and --text contradict each other; choose one.")
        if len(model_dirs) > 1 and not compare:
            raise LlmctlError(f"{len(model_dirs)} dirs given; pass --compare to profile several side by side.")
        if compare:
            report = run_compare(model_dirs, data, text or [], split, max_tokens or 65536)
            if json_out:
                print_json(report)
            else:
                out_console.print(compare_table(report))
            worst = max((r["perplexity"] for r in report["rows"] if r["perplexity"] is not None), default=None)
            if max_ppl is not None and worst is not None and worst > max_ppl:
                say(f"[red]gate failed:[/] perplexity {worst:.3f} > --max-ppl {max_ppl}")
                raise typer.Exit(EXIT_GATE_FAILED)
            return
        report = run_eval(model_dirs[0], data, text or [], split, max_tokens, batch_size)
        samples = _samples(report.pop("_loaded"), prompt or [], max_new_tokens, temperature, top_k, top_p, seed)
        report["samples"] = samples
        if json_out:
            print_json(report)
        else:
            _print_report(report)
        if max_ppl is not None and report["perplexity"] > max_ppl:
            say(f"[red]gate failed:[/] perplexity {report['perplexity']:.3f} > --max-ppl {max_ppl}")
            raise typer.Exit(EXIT_GATE_FAILED)


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
        model = load_for_inference(path, onnx_file=graph)
        if tokens is None:
            tokens, source, _ = _eval_tokens(model, data, text, split)
            tokens = tokens[: max_tokens + 1]
            byte_lengths = token_byte_lengths(model.tokenizer)
        elif model.tokenizer.get_vocab() != loaded[0].tokenizer.get_vocab():
            raise LlmctlError(f"{path}: its tokenizer differs from {paths[0]}'s; --compare needs models that share one.")
        loaded.append(model)
        names.append(str(path))
    say(f"profiling {len(loaded)} models on {len(tokens) - 1:,} tokens; timings interleaved")
    rows = [p.to_dict() for p in profile_models(loaded, tokens, byte_lengths, names)]
    base = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_change_pct"] = 100 * (r["perplexity"] / base - 1) if base and r["perplexity"] else None
    return {"source": source, "tokens": int(len(tokens) - 1), "rows": rows}


def compare_table(report: dict):
    from rich.table import Table

    from llmctl.training.memory import human_bytes

    table = Table(title=f"on {report['source']}, {report['tokens']:,} tokens", header_style="bold", box=None, title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("backend", no_wrap=True)
    for col in ("perplexity", "Δ%", "size", "forward ms", "gen tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        delta = r["perplexity_change_pct"]
        table.add_row(
            r["name"], r["backend"], f"{r['perplexity']:.3f}", "-" if delta is None else f"{delta:+.2f}",
            human_bytes(r["size_bytes"]), f"{r['forward_ms']:.2f}", f"{r['generate_tokens_per_s']:.0f}",
        )
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
    byte_lengths = token_byte_lengths(loaded.tokenizer)
    result = evaluate_tokens(loaded.model, tokens, byte_lengths, source=source, batch_size=batch_size, max_tokens=max_tokens)
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
