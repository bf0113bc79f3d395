"""Shell completion as a person meets it: the shipped completions/llmctl.bash sourced into a real interactive
bash inside tmux, keys sent with `send-keys`, the screen read back with `capture-pane`.

After each TAB the test types a sentinel character, so the line shows whether bash added a space after the
completed word (`recipes/ Z` against `recipes/Z`). A wrapper named `llmctl` first on PATH runs the real one
and counts the completion calls, so the test waits for exactly as many as it caused, never for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SENTINEL = "Z"


def _missing() -> str | None:
    for tool in ("tmux", "bash"):
        if shutil.which(tool) is None:
            return (f"INTERACTIVE COMPLETION NOT TESTED: {tool} is not installed (apt-get install {tool}); "
                    "completions/llmctl.bash was not driven in a real shell")
    return None


class Bash:
    """An interactive bash in a detached tmux session with llmctl's completion sourced."""

    def __init__(self, cwd: Path) -> None:
        self.socket = f"llmctl-test-{uuid.uuid4().hex[:8]}"
        self.calls = cwd.parent / "completion-calls"
        bindir = cwd.parent / "bin"
        bindir.mkdir()
        real = Path(sys.executable).parent / "llmctl"
        command = f'"{real}"' if real.is_file() else f'"{sys.executable}" -m llmctl'
        wrapper = bindir / "llmctl"
        wrapper.write_text(f'#!/bin/bash\n{command} "$@"\nrc=$?\n[ -n "$_LLMCTL_COMPLETE" ] && echo . >> "{self.calls}"\n'
                           "exit $rc\n")
        wrapper.chmod(0o755)
        rc = cwd.parent / "bashrc"
        rc.write_text(f"PS1='$ '\nexport PATH={bindir}:$PATH\nbind 'set bell-style none'\n"
                      f"source {REPO / 'completions' / 'llmctl.bash'}\ncd {cwd}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        self._tmux("new-session", "-d", "-x", "200", "-y", "50", f"bash --noprofile --rcfile {rc} -i", env=env)
        self._wait_for(lambda: self.screen().rstrip().endswith("$"), "the prompt")

    def _tmux(self, *args: str, env: dict | None = None) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              env=env, timeout=30).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p")

    def _wait_for(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout} s for {what}; screen:\n{self.screen()}")
            time.sleep(0.1)

    def _count(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def complete(self, line: str, tabs: int = 1, calls: int | None = None) -> str:
        """Type `line`, press TAB `tabs` times, type the sentinel; the screen (cleared before each line).

        `calls`: how many times bash runs llmctl's completion for these TABs (default one each; fewer when bash
        falls back to its own file completion)."""
        self._tmux("send-keys", "C-u")
        self._tmux("send-keys", "-l", line)
        for _ in range(tabs):
            before = self._count()
            self._tmux("send-keys", "Tab")
            if calls is None or calls > 0:
                self._wait_for(lambda: self._count() > before, f"completion of {line!r}")
                calls = None if calls is None else calls - 1
            time.sleep(0.3)  # bash inserts COMPREPLY after the function returns
        self._tmux("send-keys", "-l", SENTINEL)
        self._wait_for(lambda: SENTINEL in self.screen().rstrip().splitlines()[-1], "the sentinel")
        shown = self.screen().strip()
        self._tmux("send-keys", "C-u")
        self._tmux("send-keys", "clear", "Enter")
        self._wait_for(lambda: self.screen().strip() == "$", "a clear screen")
        return shown

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def shell(tmp_path: Path):
    why = _missing()
    if why:
        pytest.skip(why)
    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "tiny-gpt.yaml", work / "recipes" / "tiny-gpt.yaml")
    (work / "notes.txt").write_text("a file completion would offer\n")
    (work / "runs" / "my" / "model").mkdir(parents=True)
    (work / "runs" / "my" / "model" / "config.json").write_text("{}")
    bash = Bash(work)
    yield bash
    bash.close()


def last_line(screen: str) -> str:
    return screen.splitlines()[-1]


def test_a_directory_completes_without_a_trailing_space(shell: Bash) -> None:
    assert last_line(shell.complete("llmctl train rec")) == f"$ llmctl train recipes/{SENTINEL}"


def test_a_recipe_key_completes_to_its_equals_sign_without_a_space(shell: Bash) -> None:
    got = last_line(shell.complete("llmctl train recipes/tiny-gpt.yaml model.fam"))
    assert got == f"$ llmctl train recipes/tiny-gpt.yaml model.family={SENTINEL}"
    listing = shell.complete("llmctl train recipes/tiny-gpt.yaml model.family=", tabs=2)
    assert {"gpt", "rnn", "lstm", "gru"} <= set(listing.split()), listing


def test_a_complete_argument_still_ends_with_a_space(shell: Bash) -> None:
    assert last_line(shell.complete("llmctl eval runs/my/mo")) == f"$ llmctl eval runs/my/model {SENTINEL}"
    assert last_line(shell.complete("llmctl trai")) == f"$ llmctl train {SENTINEL}"


def test_eval_tab_tab_with_no_runs_descends_instead_of_repeating_the_dir(shell: Bash) -> None:
    shutil.rmtree(Path(shell.calls.parent / "work" / "runs"))
    screen = shell.complete("llmctl eval ", tabs=2, calls=2)
    assert "recipes/ recipes/" not in screen
    assert last_line(screen).startswith("$ llmctl eval recipes/")


@pytest.mark.parametrize("line, choices", [
    ("llmctl export runs/my/model -o out/x --format ", ["hf", "onnx"]),
    ("llmctl export runs/my/model -o out/x --quantize ", ["int8", "none"]),
    ("llmctl compress runs/my/model -o out/x --quantize ", ["int4-weight", "int8", "int8-weight", "none"]),
    ("llmctl compress runs/my/model -o out/x --prune-method ", ["global", "layer", "structured"]),
    ("llmctl eval runs/my/model --split ", ["train", "val"]),
])
def test_an_option_with_choices_lists_its_choices_not_files(shell: Bash, line: str, choices: list[str]) -> None:
    screen = shell.complete(line, tabs=2)
    listed = set(screen.split()) - set(line.split()) - {"$", SENTINEL}
    assert "notes.txt" not in screen and "recipes/" not in listed, screen
    assert set(choices) <= listed, screen
