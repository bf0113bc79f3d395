"""`llmctl serve`: an OpenAI-compatible HTTP server (completions, chat, models) over a model or export dir, or
POST /v1/classify over a classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llmctl.cli.completion import complete_model_or_export_dir
from llmctl.cli.output import reporting_errors, say, say_always

EPILOG = (
    "Examples: llmctl serve runs/tiny-gpt/model  |  llmctl serve out/tiny-onnx --port 8080 --api-key s3cret  |  "
    "llmctl serve out/tiny-onnx --graph int8  |  "
    "curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"def \", \"max_tokens\": 32}'"
    "  |  a classifier: curl localhost:8000/v1/classify -d '{\"input\": [\"the plot was good\", \"not great\"]}'"
)


def serve_cli(
    path: Path = typer.Argument(
        ..., help="Model dir (torch; compressed too) or export dir (ONNX Runtime).", autocompletion=complete_model_or_export_dir
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LLMCTL_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1/* (else 401); the env var keeps it out of `ps`.",
    ),
    max_batch_size: Optional[int] = typer.Option(
        None, "--max-batch-size", min=1, help="Sequences decoded together (a language model; default 16)."
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", min=1,
        help="Sequences (a classifier: requests) waiting for the model; beyond it requests get 503 + Retry-After.",
    ),
    max_tokens_limit: Optional[int] = typer.Option(
        None, "--max-tokens-limit", min=1, help="Largest max_tokens a request may ask for (default: the context length)."
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16: weights and compute of a torch model dir."),
    graph: Optional[str] = typer.Option(
        None, "--graph",
        help="fp32 | int8: the graph of an export dir ONNX Runtime runs: model.onnx (default) or model.int8.onnx "
        "(written by `export --quantize int8`).",
    ),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model's id in the API (default: the run's name)."),
) -> None:
    """Serve a model over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions, /v1/models, streaming too;
    a classifier answers POST /v1/classify with labels and probabilities."""
    with reporting_errors():
        from llmctl.cli.progress import WorkProgress
        from llmctl.serving.server import ServeOptions, serve

        options = ServeOptions(
            path=path, host=host, port=port, api_key=api_key or None, max_batch_size=max_batch_size,
            max_queue=max_queue, max_tokens_limit=max_tokens_limit, dtype=dtype, graph=graph, model_name=model_name,
        )
        code = serve(options, say=lambda text: say(_escape(text)), progress=WorkProgress(),
                     announce=lambda text: say_always(_escape(text)))
        if code:
            raise typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
