"""Integration fixtures: a tiny corpus and recipe in a temp dir, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.cli_process import run_llmctl

WORDS = (
    "def return class import self if else elif for while in not and or None True False print value key "
    "data list dict range len yield lambda try except raise with as pass break continue"
).split()


def write_corpus(folder: Path, files: int = 6, lines: int = 300, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = "\n".join(
            "    " * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
            for _ in range(lines)
        )
        (folder / f"doc{i}.txt").write_text(body + "\n", encoding="utf-8")


TINY_RECIPE = """\
# a tiny recipe for tests
run: {{seed: 0}}
data:
  sources: [corpus]
  vocab_size: 300
  val_fraction: 0.2
model: {{n_layer: 2, n_head: 2, d_model: 32, context_length: 32}}
train:
  max_steps: {max_steps}
  batch_size: 8
  micro_batch_size: 4
  lr: 3.0e-3
  warmup_steps: 2
  eval_every: 5
  eval_batches: 4
  log_every: 1
  checkpoint_every: 5
  keep_checkpoints: 10
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE.format(max_steps=10), encoding="utf-8")
    return tmp_path


def train_tiny(root: Path, max_steps: int = 10) -> Path:
    """`root` with the tiny corpus, tiny.yaml and a model trained on them at runs/tiny/model; returns `root`."""
    write_corpus(root / "corpus")
    (root / "tiny.yaml").write_text(TINY_RECIPE.format(max_steps=max_steps), encoding="utf-8")
    run_cli(root, "train", "tiny.yaml")
    return root


def _run(cwd: Path, env: dict[str, str], args: tuple[str, ...], check: bool, timeout: float) -> subprocess.CompletedProcess:
    proc = run_llmctl(cwd, args, {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env}, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmctl {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_cli(cwd: Path, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m llmctl ARGS` in `cwd` as a user would, in its own process, with output captured
    (forked from a server that has imported torch already: tests/cli_process.py)."""
    return _run(cwd, {}, args, check, timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """A failure a person can act on: the exit status, the named problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


FAULTS = Path(__file__).resolve().parent / "faults"


def run_cli_with(cwd: Path, env_extra: dict[str, str], *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI with tests/integration/faults on PYTHONPATH (fault injection, tracing)."""
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return _run(cwd, {"PYTHONPATH": path, **env_extra}, args, check, timeout)
