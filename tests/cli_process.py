"""Run the real `llmctl` in a fresh process without paying the interpreter's start-up and `import torch` again.

A CLI test is meant to run the command as a user would: its own process, its own exit status, stdout and
stderr captured from the file descriptors (so the subprocesses it starts write there too), nothing shared
with the test or with the command before it. On the machines CI runs on, though, `import torch` alone
takes 2-5 s, and a subprocess per command made that most of the suite's time.

So each command runs in a child *forked* from a server process (multiprocessing's "forkserver") that has
already imported the heavy third-party libraries, and nothing else: llmctl itself is imported fresh in
every child, after its environment, working directory and argv are set, so module-level state (rich's
consoles read NO_COLOR and COLUMNS when made) is exactly what `python -m llmctl` would have. The child
runs `python -m llmctl`'s own entry (runpy, as `-m` does), prints an escaping exception as the interpreter
would, runs the atexit handlers, and exits with the same status.

A command whose PYTHONPATH adds folders in front of this process's (tests/integration/faults: fault
injection through a `sitecustomize` that Python imports at start-up) is forked too: the child puts those
folders first on sys.path and runs the first `sitecustomize.py` among them before llmctl, with its
environment already set, as the interpreter would at start-up. What it cannot stand in for stays a real
subprocess: any other PYTHONPATH, killed or signalled commands (they need a Popen), and the packaging tests.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

# Imported once in the server: the libraries that make a CLI start slow. None of them reads anything a
# test varies when imported (OMP_NUM_THREADS is set for the whole worker before the server starts).
PRELOAD = ["torch", "accelerate", "safetensors.torch", "tokenizers", "numpy", "yaml", "rich.console", "typer",
           "pydantic"]


@functools.cache
def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _exit_status(code: object) -> int:
    """What the interpreter makes of `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _added_path(env: dict[str, str]) -> list[str] | None:
    """The folders `env`'s PYTHONPATH puts in front of this process's; None when it differs otherwise."""
    ours = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    theirs = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if len(theirs) < len(ours) or theirs[len(theirs) - len(ours):] != ours:
        return None
    return theirs[: len(theirs) - len(ours)]


def _run_start_up_hooks(folders: list[str]) -> None:
    """What Python does at start-up with these folders on PYTHONPATH: they go first on sys.path, and the
    first `sitecustomize.py` among them is imported (as `sitecustomize`)."""
    import importlib.util

    sys.path[0:0] = folders
    for folder in folders:
        path = Path(folder, "sitecustomize.py")
        if path.is_file():
            spec = importlib.util.spec_from_file_location("sitecustomize", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            spec.loader.exec_module(module)
            return


def _run_llmctl(cwd: str, env: dict[str, str], args: list[str], stdout_path: str, stderr_path: str,
                start_up_path: list[str]) -> None:
    """The child: become `python -m llmctl ARGS` in `cwd` with exactly `env`, then exit as it would."""
    import runpy
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["llmctl", *args]
    try:
        _run_start_up_hooks(start_up_path)
        runpy.run_module("llmctl", run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException:  # what the interpreter does with an exception nobody caught
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_llmctl(cwd: Path, args: Sequence[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m llmctl ARGS` in `cwd` with environment `env`, as `subprocess.run(..., capture_output=True,
    text=True, timeout=timeout)` would report it (TimeoutExpired after killing it, like subprocess.run).

    A command whose PYTHONPATH is this process's with folders added in front runs their sitecustomize in
    the forked child; with any other PYTHONPATH it runs as a plain subprocess, and so does every command
    when LLMCTL_TEST_SUBPROCESS=1 is set, to check that the two ways agree."""
    command = [sys.executable, "-m", "llmctl", *args]
    start_up_path = _added_path(env)
    if start_up_path is None or os.environ.get("LLMCTL_TEST_SUBPROCESS") == "1":
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="llmctl-cli-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        child = _context().Process(target=_run_llmctl, args=(str(cwd), dict(env), list(args), str(out), str(err),
                                                                 start_up_path))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout, output=out.read_text(), stderr=err.read_text())
        # exitcode is -N for a child killed by signal N, as subprocess reports it
        return subprocess.CompletedProcess(command, child.exitcode, out.read_text(), err.read_text())
