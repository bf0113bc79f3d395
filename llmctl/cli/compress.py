"""`llmctl compress`: prune and/or quantize a model dir into a new one, with a before/after report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from llmctl.cli.completion import choices, complete_model_dir, complete_recipe_file
from llmctl.cli.output import add_disturbed_caption, out_console, print_json, reporting_errors, say

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
        from llmctl.tasks import task_of

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
            return
        task = task_of(output)
        out_console.print(compression_table(report, task))
        for what, why in task.compression.report_notes(report):
            say(f"[yellow]{what}:[/] {why}")
        say(f"wrote {output} (report: {output / 'compression.json'})")


def compression_table(report: dict[str, Any], task: Any) -> Any:
    """compression.json's before/after table, its rows as `task`'s compression module writes them."""
    from rich.table import Table

    table = Table(title="compression (same machine, same run)", header_style="bold", box=None, title_justify="left")
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        table.add_column(col, justify=justify)
    for row in task.compression.report_rows(report):
        table.add_row(*row)
    add_disturbed_caption(table, [report["before"], report["after"]])
    return table
