"""`llmctl compress`: prune and/or quantize a model dir into a new one, with a before/after report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from llmctl.cli.completion import choices, complete_model_dir, complete_recipe_file
from llmctl.cli.output import add_disturbed_caption, out_console, print_json, reporting_errors, say, timed

EPILOG = (
    "Examples: llmctl compress runs/tiny-gpt/model --prune 0.3 --quantize int8 -o out/tiny-int8  |  "
    "llmctl compress runs/tiny-gpt/model --prune 0.25 --prune-method structured --recover-steps 200 -o out/tiny-small"
)

# The keys that choose what compress does: naming any of them on the command line keeps the recipe's others out.
ACTIONS = ("prune", "quantize", "recover_steps")
# When a recipe value matters for the options resolved (and so is worth a "from recipe" line).
_APPLIES = {
    "prune_method": lambda o: o.prune > 0,
    "recover_lr": lambda o: o.prune > 0 and o.recover_steps > 0,
    "calibration_tokens": lambda o: o.prune > 0 and o.prune_method == "structured",
}

# CLI flag -> compress section key, for messages that name what the user typed.
_FLAGS = {
    "prune": "--prune",
    "prune_method": "--prune-method",
    "recover_steps": "--recover-steps",
    "recover_lr": "--recover-lr",
    "quantize": "--quantize",
    "eval_tokens": "--eval-tokens",
}


def compress_cli(
    model_dir: Path = typer.Argument(..., help="Model dir to compress (runs/<name>/model).", autocompletion=complete_model_dir),
    output: Path = typer.Option(..., "--output", "-o", help="New model dir to write."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Share to prune, 0 <= S < 1 (weights, or heads and channels if structured)."),
    prune_method: Optional[str] = typer.Option(
        None, "--prune-method", help="global or layer: zero the smallest weights (over all layers, or per layer); "
        "structured: remove whole heads and MLP channels (a smaller dense model).",
        autocompletion=choices("global", "layer", "structured"),
    ),
    recover_steps: Optional[int] = typer.Option(None, "--recover-steps", help="Fine-tune this many steps after pruning."),
    recover_lr: Optional[float] = typer.Option(None, "--recover-lr", help="Learning rate of the recovery fine-tune (default train.lr / 10)."),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: int8 matmuls, activations quantized at run time; pays on large matmuls (GPT-2-small "
        "shapes: 2-5x fp32 in BENCHMARKS.md), not on tiny ones (d_model 128: 0.7-1x). int8-weight, int4-weight: "
        "weight-only (smaller files; matmuls in bf16). Classifiers: int8.",
        autocompletion=choices("none", "int8", "int8-weight", "int4-weight"),
    ),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="Take defaults from this recipe's compress section (else the model's own recipe's).",
        autocompletion=complete_recipe_file,
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset dir whose val split scores the models (default: the model's own)."),
    eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", help="Val tokens to score before and after."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the latency and generation timings."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output dir if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
) -> None:
    """Prune and/or quantize a model dir; writes a model dir that eval, export and serve load as is.

    With neither --prune nor --quantize, both come from the recipe's compress section (each printed); naming
    either leaves the recipe's other one out."""
    with reporting_errors(json_out):
        from llmctl.artifacts import refuse_output_over_inputs
        from llmctl.cli.sections import inputs_of, resolve_section
        from llmctl.compression.pipeline import compress_model, describe
        from llmctl.models.loading import require_model_dir

        require_model_dir(model_dir, "compress")
        refuse_output_over_inputs("-o", output, inputs_of(model_dir, data))
        flags = {"prune": prune, "prune_method": prune_method, "recover_steps": recover_steps, "recover_lr": recover_lr,
                 "quantize": quantize, "eval_tokens": eval_tokens}
        resolved = resolve_section(model_dir, recipe, "compress", {k: v for k, v in flags.items() if v is not None}, _FLAGS,
                                   actions=ACTIONS, applies=_APPLIES)
        options = resolved.options
        for line in resolved.lines("compress"):
            say(line)
        from llmctl.cli.progress import WorkProgress

        if options.prune or options.quantize != "none":  # else compress_model says there is nothing to do
            say(f"compressing {model_dir}: {describe(options)}")
        with WorkProgress() as progress:
            report = compress_model(
                model_dir, output, options, data=data, overwrite=overwrite, measure_speed=not no_speed, progress=progress
            )
        report["from_recipe"] = {f"compress.{key}": value for key, value in resolved.from_recipe}
        report["output"] = str(output)
        if json_out:
            print_json(report)
        else:
            if report.get("task") == "classification":
                out_console.print(classifier_report_table(report))
                if report.get("metrics_not_measured"):
                    say(f"[yellow]accuracy and F1 not measured:[/] {report['metrics_not_measured']}")
            else:
                out_console.print(report_table(report))
                if report.get("perplexity_not_measured"):
                    say(f"[yellow]perplexity not measured:[/] {report['perplexity_not_measured']}")
            say(f"wrote {output} (report: {output / 'compression.json'})")


def _table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="compression (same machine, same run)", header_style="bold", box=None, title_justify="left")
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        table.add_column(col, justify=justify)
    return table


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _change(x: Any, y: Any, *, pct: bool = False) -> str:
    if not x or not y:
        return "-"
    if pct:
        return f"{100 * (y / x - 1):+.2f}%"
    return f"{y / x:.2f}x"


def speed_change(ratio: float | None) -> str:
    """A speed ratio (after / before; above 1 is faster) as people say it: `2.00× faster`, `1.45× slower`."""
    if not ratio:
        return "-"
    if ratio >= 1:
        return f"{ratio:.2f}× faster"
    return f"{1 / ratio:.2f}× slower"


def classifier_report_table(report: dict[str, Any]) -> Any:
    from llmctl.units import human_bytes

    b, a = report["before"], report["after"]
    table = _table(report)

    def points(x: Any, y: Any) -> str:
        return "-" if x is None or y is None else f"{100 * (y - x):+.2f} pts"

    table.add_row("parameters", _num(b["parameters"], ","), _num(a["parameters"], ","), _change(b["parameters"], a["parameters"]))
    table.add_row("non-zero parameters", _num(b["nonzero_parameters"], ","), _num(a["nonzero_parameters"], ","),
                  _change(b["nonzero_parameters"], a["nonzero_parameters"]))
    table.add_row("size on disk", human_bytes(b["size_bytes"]), human_bytes(a["size_bytes"]), _change(b["size_bytes"], a["size_bytes"]))
    examples = f" ({b['examples']:,} texts)" if b["examples"] else ""
    table.add_row(f"val accuracy{examples}", _num(b["accuracy"], ".4f"), _num(a["accuracy"], ".4f"), points(b["accuracy"], a["accuracy"]))
    table.add_row("val macro-F1", _num(b["macro_f1"], ".4f"), _num(a["macro_f1"], ".4f"), points(b["macro_f1"], a["macro_f1"]))
    shape = f" ({b['forward_batch']} x {b['forward_tokens']} tokens)" if b["forward_ms"] else ""
    speed = speed_change(b["forward_ms"] / a["forward_ms"] if b["forward_ms"] and a["forward_ms"] else None)
    table.add_row(f"forward latency{shape}", *[timed(_num(m["forward_ms"], ".2f") + " ms", m) if m["forward_ms"] else "-"
                                               for m in (b, a)], speed)
    add_disturbed_caption(table, [b, a])
    return table


def report_table(report: dict[str, Any]) -> Any:
    from llmctl.units import human_bytes

    b, a = report["before"], report["after"]
    table = _table(report)
    num, change = _num, _change

    table.add_row("parameters", num(b["parameters"], ","), num(a["parameters"], ","), change(b["parameters"], a["parameters"]))
    table.add_row("non-zero parameters", num(b["nonzero_parameters"], ","), num(a["nonzero_parameters"], ","),
                  change(b["nonzero_parameters"], a["nonzero_parameters"]))
    table.add_row("size on disk", human_bytes(b["size_bytes"]), human_bytes(a["size_bytes"]), change(b["size_bytes"], a["size_bytes"]))
    table.add_row("val perplexity", num(b["perplexity"], ".3f"), num(a["perplexity"], ".3f"), change(b["perplexity"], a["perplexity"], pct=True))
    tokens = b.get("forward_tokens")
    ms = [timed(num(m["forward_ms"], ".2f") + " ms", m) if m["forward_ms"] else "-" for m in (b, a)]
    forward = speed_change(b["forward_ms"] / a["forward_ms"] if b["forward_ms"] and a["forward_ms"] else None)
    table.add_row(f"forward latency (1 x {tokens} tokens)" if tokens else "forward latency (not measured)", *ms, forward)
    generate = b["generate_tokens_per_s"], a["generate_tokens_per_s"]
    table.add_row("generate tokens/s", *[timed(num(m["generate_tokens_per_s"], ".1f"), m) for m in (b, a)],
                  speed_change(generate[1] / generate[0] if all(generate) else None))
    add_disturbed_caption(table, [b, a])
    return table
