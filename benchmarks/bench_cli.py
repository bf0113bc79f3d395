#!/usr/bin/env python
"""Start-up cost of the CLI: `llmctl --help` and one recipe-key completion, against `import torch`.

    .venv/bin/python benchmarks/bench_cli.py [--rounds R]

Each round runs three fresh processes, in an order rotated every round so none always goes first:
`llmctl --help`, a bash completion of `llmctl train recipes/tiny-gpt.yaml train.l` (typer's
protocol, as the shell sends it), and `python -c "import torch"` (the floor any command that
trains pays). Wall time per process from spawn to exit. The figures judged are ratios of medians
measured in the same run, llmctl over `import torch`: a busy machine slows all three alike, where
absolute seconds would mostly measure the load. The unit tests pin what does not depend on load
(no heavy library imported, a module budget); this is where the seconds live.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LLMCTL = [str(BIN / "llmctl")] if (BIN / "llmctl").is_file() else [sys.executable, "-m", "llmctl"]
COMPLETION_ENV = {"_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl train recipes/tiny-gpt.yaml train.l",
                  "COMP_CWORD": "3"}
CASES = {
    "llmctl --help": (LLMCTL + ["--help"], {}),
    "completion of train.l": (LLMCTL, COMPLETION_ENV),
    "import torch": ([sys.executable, "-c", "import torch"], {}),
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_once(command: list[str], extra_env: dict[str, str]) -> float:
    """Seconds from spawn to exit of one fresh process."""
    env = {**os.environ, "NO_COLOR": "1", **extra_env}
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), Python {platform.python_version()}")
    names = list(CASES)
    for name in names:  # warm the page cache and the bytecode caches once, untimed
        time_once(*CASES[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(time_once(*CASES[name]))
    torch_median = statistics.median(times["import torch"])
    print(f"{'process':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'/ import torch':>15}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:<24} {median:9.3f} {min(times[name]):7.3f} {max(times[name]):7.3f} {median / torch_median:14.2f}x")
    print(f"{args.rounds} interleaved rounds; ratios are of medians in this run")


if __name__ == "__main__":
    main()
