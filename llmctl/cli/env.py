"""`llmctl env`: what this machine offers (versions, CPU, memory, GPUs, backends)."""

from __future__ import annotations

import typer

from llmctl.cli.output import out_console, print_json, reporting_errors

EPILOG = "Example: llmctl env --json"


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "unknown"


def env_cli(json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """Show Python/torch/accelerate/CUDA versions, CPU cores and memory, GPUs and distributed backends."""
    from llmctl.training.environment import describe_environment

    with reporting_errors(json_out):
        env = describe_environment()
        if json_out:
            print_json(env)
            return
        from rich.table import Table

        table = Table(box=None, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("python", env["python"])
        table.add_row("torch", f"{env['torch']} (CUDA {env['cuda'] or 'none'})")
        table.add_row("accelerate", env["accelerate"])
        bf16 = "with" if env["cpu"]["bf16_units"] else "without"
        table.add_row("cpu", f"{env['cpu']['usable']} usable of {env['cpu']['cores']} cores, {bf16} bf16 matrix units")
        table.add_row("memory", f"{_gib(env['memory']['available_bytes'])} available of {_gib(env['memory']['total_bytes'])}")
        backends = ", ".join(name for name, ok in env["distributed_backends"].items() if ok) or "none"
        table.add_row("backends", backends)
        if not env["gpus"]:
            table.add_row("gpus", "none (training runs on the CPU)")
        for gpu in env["gpus"]:
            table.add_row(
                f"gpu {gpu['index']}",
                f"{gpu['name']}, {_gib(gpu['free_bytes'])} free of {_gib(gpu['memory_bytes'])}, "
                f"compute {gpu['compute_capability']}, bf16 {'yes' if gpu['bf16'] else 'no'}",
            )
        out_console.print(table)
