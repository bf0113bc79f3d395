"""The test harness's forked CLI (tests/cli_process.py) reports what a plain `python -m llmctl` subprocess does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_process import run_llmctl

CASES = [
    ["--version"],
    ["train", "no_such_recipe.yaml"],
    ["recipes", "ls"],
    ["recipes", "show", "tiny-gpt"],
    ["tran"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(a) for a in CASES])
def test_a_forked_command_prints_and_exits_as_its_subprocess_does(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    plain = subprocess.run([sys.executable, "-m", "llmctl", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    forked = run_llmctl(tmp_path, args, env, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)


def test_the_child_has_the_given_directory_and_environment_and_its_own_llmctl(tmp_path: Path) -> None:
    """`recipes cp` writes relative to the child's working directory; LLMCTL_QUIET from the given env silences
    stderr; the test's own environment and directory are left as they were."""
    before = dict(os.environ)
    env = {**os.environ, "LLMCTL_QUIET": "1", "COLUMNS": "200"}
    done = run_llmctl(tmp_path, ["recipes", "cp", "tiny-gpt", "mine.yaml"], env, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert (tmp_path / "mine.yaml").is_file()
    assert dict(os.environ) == before  # the test's own process is untouched


def test_a_command_past_its_timeout_is_killed_and_reported_as_subprocess_does(tmp_path: Path) -> None:
    # 10 ms: less than importing llmctl's CLI takes, so the child is always still running.
    with pytest.raises(subprocess.TimeoutExpired):
        run_llmctl(tmp_path, ["serve", "no_such_dir", "--port", "0"], {**os.environ}, timeout=0.01)


def _path_with(folder: Path) -> str:
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def test_a_sitecustomize_added_in_front_of_pythonpath_runs_in_the_forked_child_as_at_start_up(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, sys\nprint('start-up hook, quiet=' + os.environ.get('LLMCTL_QUIET', '-'), file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": _path_with(hooks), "LLMCTL_QUIET": "1"}
    plain = subprocess.run([sys.executable, "-m", "llmctl", "--version"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    forked = run_llmctl(tmp_path, ["--version"], env, timeout=120)
    assert forked.stderr.startswith("start-up hook, quiet=1\n")
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)


def test_an_injected_full_disk_fails_the_forked_command_as_it_fails_the_subprocess(tmp_path: Path) -> None:
    faults = Path(__file__).resolve().parents[1] / "integration" / "faults"
    results = []
    for name in ("plain", "forked"):
        (tmp_path / name).mkdir()
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONPATH": _path_with(faults),
               "LLMCTL_TEST_FAULT": f"write-fails:ENOSPC:{tmp_path / name}/*"}
        args = ["recipes", "cp", "tiny-gpt", "mine.yaml"]
        if name == "plain":
            done = subprocess.run([sys.executable, "-m", "llmctl", *args], cwd=tmp_path / name, env=env,
                                  capture_output=True, text=True, timeout=120)
        else:
            done = run_llmctl(tmp_path / name, args, env, timeout=120)
        results.append((done.returncode, done.stdout, done.stderr.replace(name, "DIR")))
    assert results[0] == results[1]
    # `recipes cp` on a full disk: one line naming the file, exit 1, no traceback (and nothing left behind)
    status, _, stderr = results[1]
    assert status == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("error: cannot write the recipe mine.yaml: no space left on device"), stderr
    assert not any((tmp_path / "forked").iterdir())
