"""Start `llmctl train` in several processes through `accelerate launch` (torchrun underneath).

llmctl never spawns workers or sets up collectives itself: it builds the
`accelerate launch ... -m llmctl train ...` command line and waits for it. The
child processes see LLMCTL_LAUNCHED=1 and train in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmctl.errors import LlmctlError

LAUNCHED_ENV = "LLMCTL_LAUNCHED"
# Accelerate joins launched workers into a gloo group (MULTI_CPU) only when its state is built with
# cpu=True; `accelerate launch --multi_gpu` resets ACCELERATE_USE_CPU, so llmctl passes its own flag
# and the trainer builds its state with it. Without it each CPU worker silently trains alone.
CPU_WORKERS_ENV = "LLMCTL_CPU_WORKERS"


def launched() -> bool:
    """True inside a process that `accelerate launch` started for llmctl."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def cpu_workers() -> bool:
    """True inside a worker of a multi-process run on a machine without GPUs."""
    return os.environ.get(CPU_WORKERS_ENV) == "1"


def is_main_process() -> bool:
    """Rank 0 (or the only process); read from the launcher's environment, without importing torch."""
    return os.environ.get("RANK", "0") == "0"


def parse_devices(spec: str) -> list[int]:
    """'0,2' -> [0, 2]; refuses anything but distinct non-negative integers."""
    try:
        ids = [int(part) for part in spec.split(",") if part.strip() != ""]
    except ValueError:
        raise LlmctlError(f"--devices {spec!r}: expected GPU indices separated by commas, e.g. 0,2.") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise LlmctlError(f"--devices {spec!r}: expected distinct GPU indices separated by commas, e.g. 0,2.")
    return ids


def check_devices(ids: list[int]) -> None:
    """Refuse GPU indices this machine does not have."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in ids if i >= count]
    if missing:
        have = f"GPUs 0..{count - 1}" if count else "no GPU"
        raise LlmctlError(f"--devices asks for GPU {', '.join(map(str, missing))}, but this machine has {have}.")


def check_accelerate_config(path: Path) -> int | None:
    """Refuse a config file Accelerate could not read, before starting any process; return the number of
    processes it asks for (None when it names none)."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.is_file():
        raise LlmctlError(f"--accelerate-config {path}: no such file.")
    try:
        config = load_config_from_file(str(path))
    except Exception as e:  # yaml, json and dataclass errors alike: the file is what is wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmctlError(
            f"--accelerate-config {path}: not a valid Accelerate config ({first}); "
            "write one with `accelerate config --config_file PATH`."
        ) from None
    processes = getattr(config, "num_processes", None)
    return processes if isinstance(processes, int) and processes > 0 else None


def launch_command(
    train_args: list[str], *, nproc: int | None, accelerate_config: Path | None, fsdp: bool
) -> list[str]:
    """The `accelerate launch` command that runs `llmctl train TRAIN_ARGS` in every process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
        if nproc is not None:
            cmd += ["--num_processes", str(nproc)]
    else:
        # Without --multi_gpu, `accelerate launch --num_processes 2` silently runs one process
        # (NOTES.md); on a CPU-only machine run_launched also sets ACCELERATE_USE_CPU.
        # --use_fsdp replaces --multi_gpu (Accelerate takes one of them).
        cmd += ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
        cmd += [
            "--num_processes", str(nproc or 1),
            "--num_machines", "1",
            "--mixed_precision", "no",
            "--dynamo_backend", "no",
            "--main_process_port", "0",
        ]
    return cmd + ["-m", "llmctl", "train", *train_args]


def check_strategy(strategy: str) -> None:
    """Refuse FSDP without GPUs: there Accelerate would start unsharded, unsynchronised processes."""
    import torch

    if strategy == "fsdp" and not torch.cuda.is_available():
        raise LlmctlError(
            "train.strategy: fsdp needs CUDA GPUs (on a CPU-only machine Accelerate starts independent, "
            "unsharded processes); use train.strategy=ddp here."
        )


def run_launched(cmd: list[str], devices: list[int] | None) -> int:
    """Run the launcher and return its exit status; Ctrl-C reaches the whole process group."""
    import torch

    env = {**os.environ, LAUNCHED_ENV: "1"}
    if not torch.cuda.is_available():
        env[CPU_WORKERS_ENV] = "1"
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130
