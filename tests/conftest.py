"""Shared fixtures: a few KB of generated text, a tiny recipe, a tiny tokenizer and a tiny model.

Everything is built in the test's temp dir; nothing reaches the network.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and every llmctl process
# it starts computes on one thread: two workers with two threads each would fight for the cores, which
# slows PyTorch many times over (shared/NOTES.md). Set before torch is imported, and inherited by children.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The shape every fast test trains or runs: small enough for a fraction of a second on CPU.
TINY_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 32, "context_length": 32, "vocab_size": 300}
TINY_TRAIN = {"max_steps": 20, "batch_size": 8, "eval_every": 10, "eval_batches": 2, "log_every": 5,
              "checkpoint_every": 10, "warmup_steps": 2}

_WORDS = ["def", "return", "class", "self", "model", "token", "train", "value", "if", "else", "for", "in",
          "(", ")", ":", "=", "+", "1", "0", "x", "y", "naïve", "café"]


def generated_text(n_lines: int, seed: int = 0) -> str:
    """Deterministic code-like text, about 40 bytes a line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        indent = "    " * rng.randint(0, 2)
        lines.append(indent + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))))
    return "\n".join(lines) + "\n"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """tmp_path/corpus/ with four generated text files, a few KB each."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(generated_text(80, seed=i), encoding="utf-8")
    return folder


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Factory: write tmp_path/NAME.yaml, a tiny model on `tiny_corpus`, and chdir into tmp_path.

    Keyword arguments are sections merged over the defaults, e.g.
    `tiny_recipe("r", train={"lr": 1e-2})`; a section value of None drops that section.
    """
    monkeypatch.chdir(tmp_path)

    def make(name: str = "tiny", **sections: Any) -> Path:
        data: dict[str, Any] = {
            "run": {"seed": 0},
            "data": {"sources": ["corpus/*.txt"], "vocab_size": 300, "min_frequency": 1, "val_fraction": 0.25},
            "model": dict(TINY_MODEL),
            "train": dict(TINY_TRAIN),
        }
        data = _merge(data, {k: v for k, v in sections.items() if v is not None})
        for k, v in sections.items():
            if v is None:
                data.pop(k, None)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return make


@pytest.fixture
def tiny_tokenizer_path(tmp_path: Path) -> Path:
    """A byte-level BPE tokenizer.json (at most 300 tokens, <|endoftext|> is id 0) in tmp_path/tokenizer/."""
    from llmctl.data.tokenizer import train_tokenizer

    tok = train_tokenizer(generated_text(400).splitlines(), vocab_size=300, min_frequency=1,
                          special_tokens=["<|endoftext|>"])
    path = tmp_path / "tokenizer" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


@pytest.fixture
def tiny_gpt() -> Callable[..., Any]:
    """Factory: a freshly initialised tiny `gpt` model in eval mode, seeded so it is the same each call."""

    def make(seed: int = 0, **config: Any) -> Any:
        import torch

        from llmctl.models.gpt import GPT, GPTConfig

        torch.manual_seed(seed)
        return GPT(GPTConfig(**{**TINY_MODEL, **config})).eval()

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny tensor ops on one thread, restoring the old count after.

    On a 2-core box shared with other jobs, torch's thread pool spends longer waiting
    for its threads than computing tensors this small (measured: 3x slower).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
