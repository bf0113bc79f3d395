"""`llmctl export`: write a model dir as ONNX (KV-cached decoder or classifier) or as a Hugging Face model dir,
verified at export (against PyTorch, or transformers against llmctl)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from llmctl.cli.completion import choices, complete_model_dir, complete_recipe_file
from llmctl.cli.output import out_console, print_json, reporting_errors, say, say_always
from llmctl.errors import EXIT_GATE_FAILED, LlmctlError

EPILOG = (
    "Examples: llmctl export runs/tiny-gpt/model -o out/tiny-onnx --quantize int8  |  "
    "llmctl eval out/tiny-onnx  |  llmctl eval --compare runs/tiny-gpt/model out/tiny-onnx  |  "
    "llmctl export runs/tiny-gpt/model --format hf -o out/tiny-hf"
)

_FLAGS = {"format": "--format", "opset": "--opset", "atol": "--atol", "quantize": "--quantize",
          "external_data_mb": "--external-data-mb"}
_ONNX_ONLY = ("opset", "quantize", "external_data_mb")


def _onnx(options: Any) -> bool:
    return options.format == "onnx"


def export_cli(
    model_dir: Path = typer.Argument(..., help="Model dir to export (runs/<name>/model, or a compressed one).", autocompletion=complete_model_dir),
    output: Path = typer.Option(..., "--output", "-o", help="Export dir to write."),
    format: Optional[str] = typer.Option(
        None, "--format", help="onnx: an ONNX graph; hf: a Hugging Face Llama dir transformers loads (default onnx).",
        autocompletion=choices("onnx", "hf"),
    ),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 17 or newer (default 17)."),
    atol: Optional[float] = typer.Option(
        None, "--atol", help="Largest |ONNX - PyTorch| (hf: |transformers - llmctl|) allowed; above it export exits 3 (default 1e-4)."
    ),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: also write model.int8.onnx (ONNX Runtime dynamic int8; pays on large matmuls, "
        "not on tiny models); none: model.onnx only, whatever the recipe's export.quantize says.",
        autocompletion=choices("none", "int8"),
    ),
    external_data_mb: Optional[float] = typer.Option(None, "--external-data-mb", help="Weights above this many MB go to model.onnx.data (default 2048)."),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="Take defaults from this recipe's export section (else the model's own recipe's).",
        autocompletion=complete_recipe_file,
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Dataset dir whose val split judges the int8 graph, a classifier's parity and the hf check "
        "(default: the model's own).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output dir if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as one JSON object on stdout."),
) -> None:
    """Export to ONNX (a decoder with past key/values, or a classifier), check it against PyTorch, optionally quantize
    to int8; or, with --format hf, to a Hugging Face model dir checked with transformers."""
    with reporting_errors(json_out):
        if format not in (None, "onnx", "hf"):
            raise LlmctlError(f"--format {format!r}: expected onnx or hf.")
        from llmctl.artifacts import refuse_output_over_inputs
        from llmctl.cli.progress import WorkProgress
        from llmctl.cli.sections import inputs_of, resolve_section
        from llmctl.export.pipeline import export_model
        from llmctl.models.loading import require_model_dir

        require_model_dir(model_dir, "export")
        refuse_output_over_inputs("-o", output, inputs_of(model_dir, data))
        flags = {"format": format, "opset": opset, "atol": atol, "quantize": quantize, "external_data_mb": external_data_mb}
        resolved = resolve_section(model_dir, recipe, "export", {k: v for k, v in flags.items() if v is not None}, _FLAGS,
                                   actions=("quantize",), applies={k: _onnx for k in _ONNX_ONLY})
        options = resolved.options
        for line in resolved.lines("export", {"quantize": ": also writes model.int8.onnx; --quantize none skips it"}):
            say(line)
        typed = [_FLAGS[k] for k in _ONNX_ONLY if flags[k] is not None]
        if options.format == "hf" and typed:
            raise LlmctlError(f"{', '.join(typed)}: ONNX options; --format hf writes safetensors and takes --atol only.")
        with WorkProgress() as progress:
            report = export_model(model_dir, output, options, data=data, overwrite=overwrite, progress=progress)
        if json_out:
            print_json({**report.to_dict(), "from_recipe": {f"export.{key}": value for key, value in resolved.from_recipe}})
        else:
            out_console.print(parity_table(report.rows, options.atol, title=report.title))
            for line in report.summary:
                say(line)
        if not report.passed:
            say_always(f"[red]{report.check} failed:[/] {report.failure} The files are kept in {output} for inspection.")
            raise typer.Exit(EXIT_GATE_FAILED)


def parity_table(rows: list[dict[str, Any]], atol: float, title: str = "ONNX Runtime vs PyTorch") -> Any:
    from rich.table import Table

    table = Table(title=f"{title} (atol {atol:g})", header_style="bold", box=None, title_justify="left")
    for col in ("output", "max abs diff", "max rel diff", "worst case", "ok"):
        table.add_column(col, justify="right" if "diff" in col else "left")
    for r in rows:
        table.add_row(str(r["output"]), f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}", str(r.get("worst", "")),
                      "[green]yes[/]" if r["passed"] else "[red]NO[/]")
    return table
