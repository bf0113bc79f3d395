"""The output contract of every subcommand (DESIGN.md), through the real command on a tiny model:

`--json` prints exactly one JSON object on stdout (`{"error": {"message", "kind"}}` on failure), even for
bad usage; exit status 0 success, 1 a failure while working, 2 bad usage or input, 3 a failed gate (with the
report object still printed); `--quiet` / LLMCTL_QUIET=1 leaves stderr empty on success; output that is not
a terminal carries no escape codes, NO_COLOR or not.

One dataset and one tiny model are shared by the whole module; bad-input messages themselves are
tested in test_bad_input.py and the recipes verbs in tests/unit/test_cli_fast.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cli_process import run_llmctl
from tests.integration.conftest import FAULTS, write_corpus

ESC = "\x1b["
RECIPE = """\
run: {seed: 0}
data: {sources: [corpus], vocab_size: 300, val_fraction: 0.2}
model: {n_layer: 1, n_head: 2, d_model: 32, context_length: 32}
train: {max_steps: 4, batch_size: 8, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 2, eval_every: 2, eval_batches: 2,
        log_every: 1, checkpoint_every: 2}
"""
TUNE = "tune: {trials: 1, sampler: random, pruner: none, space: {train.lr: {type: float, low: 1.0e-3, high: 1.0e-2}}}\n"
CLASSIFIER = """\
run: {seed: 0}
data: {task: classification, sources: [reviews.csv], vocab_size: 300, max_len: 16, val_fraction: 0.25}
model: {family: rnn, d_model: 8, hidden_size: 8, n_layer: 1}
train: {epochs: 1, batch_size: 16, lr: 1.0e-3, eval_every: 3, eval_batches: 4, log_every: 1, checkpoint_every: 100}
"""


def llmctl(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real command with stdout and stderr captured (so neither is a terminal) and NO_COLOR unset:
    being piped alone must keep escape codes out."""
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "LLMCTL_QUIET", "CI")}
    return run_llmctl(cwd, args, {**base, "COLUMNS": "200", **(env or {})}, timeout)


def one_object(proc: subprocess.CompletedProcess) -> dict:
    """stdout is exactly one JSON object on one line; neither stream holds an escape code or a traceback."""
    assert ESC not in proc.stdout and ESC not in proc.stderr, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 1, proc.stdout
    obj = json.loads(proc.stdout)
    assert isinstance(obj, dict)
    return obj


def json_success(proc: subprocess.CompletedProcess, *, quiet: bool) -> dict:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    obj = one_object(proc)
    assert "error" not in obj
    if quiet:
        assert proc.stderr == "", proc.stderr
    return obj


def json_error(proc: subprocess.CompletedProcess, code: int, kind: str | None = None) -> dict:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    obj = one_object(proc)
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "kind"}, obj
    assert obj["error"]["message"] and isinstance(obj["error"]["kind"], str)
    if kind is not None:
        assert obj["error"]["kind"] == kind, obj
    assert proc.stderr.strip(), "the error is on stderr too"
    return obj["error"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A prepared dataset and a 4-step model; the prepare and train runs themselves are checked below."""
    root = tmp_path_factory.mktemp("contract")
    write_corpus(root / "corpus", files=3, lines=100)
    (root / "tiny.yaml").write_text(RECIPE, encoding="utf-8")
    (root / "tune.yaml").write_text(RECIPE + TUNE, encoding="utf-8")
    prepare = llmctl(root, "prepare", "tiny.yaml", "--json")
    train = llmctl(root, "train", "tiny.yaml", "--json", env={"LLMCTL_QUIET": "1"})
    return {"root": root, "prepare": prepare, "train": train, "model": "runs/tiny/model"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("contract-cls")
    # Texts repeat every 3 rows and labels every 2: no model reaches accuracy 1, so the gate below fails.
    rows = ["text,label"] + [
        f"the {('plot', 'cast', 'music')[i % 3]} was {('good', 'bad', 'fine')[i % 3]},{('negative', 'positive')[i % 2]}"
        for i in range(96)
    ]
    (root / "reviews.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "cls.yaml").write_text(CLASSIFIER, encoding="utf-8")
    train = llmctl(root, "train", "cls.yaml", "--json")
    return {"root": root, "train": train, "model": "runs/cls/model"}


# --- prepare, train -------------------------------------------------------------------------------------------


def test_prepare_json_with_plain_progress_then_quiet(lm: dict) -> None:
    out = json_success(lm["prepare"], quiet=False)
    assert out["dataset_dir"] == "data/tiny" and out["train_tokens"] > 0
    assert "3 files" in lm["prepare"].stderr  # the summary is for people, on stderr
    again = llmctl(lm["root"], "-q", "prepare", "tiny.yaml", "--force", "--json")
    assert json_success(again, quiet=True)["skipped"] is False
    cut = llmctl(lm["root"], "prepare", "tiny.yaml", "data.max_bytes=5000", "data.dir=data/cut", "--json")
    out = json_success(cut, quiet=False)
    assert out["text_bytes"] == 5000 and out["bytes"] > 5000  # the summary tells the two apart
    assert "MB read: data.max_bytes) -> " in cut.stderr


def test_train_quiet_json(lm: dict) -> None:
    out = json_success(lm["train"], quiet=True)  # LLMCTL_QUIET=1: not even the memory plan or steps
    assert out["step"] == 4 and out["model_dir"] == "runs/tiny/model"


def test_train_plan_json_is_one_object(lm: dict) -> None:
    out = json_success(llmctl(lm["root"], "-q", "train", "tiny.yaml", "--plan", "--json"), quiet=True)
    assert out["processes"] == 1 and "plan" in out


def test_a_failure_while_training_is_exit_1_with_the_error_object(lm: dict) -> None:
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    proc = llmctl(lm["root"], "-q", "train", "tiny.yaml", "--run-dir", "runs/nan", "--json",
                  env={"PYTHONPATH": path, "LLMCTL_TEST_FAULT": "nan-at:1"})
    json_error(proc, 1, "nonfinite")
    # --quiet: the error and nothing before it (not even torch's warning about the skipped optimizer step)
    assert proc.stderr.startswith("error: loss or gradient became NaN"), proc.stderr


def test_classifier_train_json_and_plain_lines(classifier: dict) -> None:
    out = json_success(classifier["train"], quiet=False)
    assert out["task"] == "classification"
    assert "macro-F1" in classifier["train"].stderr  # eval rows as plain lines, no bar


# --- tune -----------------------------------------------------------------------------------------------------


def test_tune_quiet_json_then_a_bad_space(lm: dict) -> None:
    out = json_success(llmctl(lm["root"], "-q", "tune", "tune.yaml", "--json"), quiet=True)
    assert out["trials"]["complete"] == 1 and out["best"]
    json_error(llmctl(lm["root"], "tune", "tiny.yaml", "--json"), 2)  # no tune.space


# --- eval -----------------------------------------------------------------------------------------------------


def test_eval_quiet_json(lm: dict) -> None:
    out = json_success(llmctl(lm["root"], "-q", "eval", lm["model"], "--max-tokens", "256", "--json"), quiet=True)
    assert out["perplexity"] > 1


def test_eval_gate_exits_3_and_still_prints_the_report(lm: dict) -> None:
    proc = llmctl(lm["root"], "eval", lm["model"], "--max-tokens", "256", "--max-ppl", "1", "--json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    out = one_object(proc)
    assert "error" not in out and out["perplexity"] > 1
    assert out["gate"]["passed"] is False and out["gate"]["max_ppl"] == 1
    assert out["gate"]["failures"][0].startswith("perplexity ")
    assert "gate failed" in proc.stderr


def test_a_failed_gate_says_why_even_with_quiet(lm: dict) -> None:
    proc = llmctl(lm["root"], "-q", "eval", lm["model"], "--max-tokens", "256", "--max-ppl", "1")
    assert proc.returncode == 3 and "gate failed" in proc.stderr, proc.stderr
    passed = json.loads(llmctl(lm["root"], "-q", "eval", lm["model"], "--max-tokens", "256", "--max-ppl", "1e9",
                               "--json").stdout)
    assert passed["gate"] == {"max_ppl": 1e9, "passed": True, "failures": []}


def test_eval_of_what_is_not_a_model_is_a_json_error(lm: dict) -> None:
    json_error(llmctl(lm["root"], "eval", "corpus", "--json"), 2)


def test_classifier_eval_gate_exits_3_and_still_prints_the_report(classifier: dict) -> None:
    proc = llmctl(classifier["root"], "eval", classifier["model"], "--min-accuracy", "1", "--json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    out = one_object(proc)
    assert "accuracy" in out and "macro" in out
    assert "gate failed" in proc.stderr


# --- compress, export -----------------------------------------------------------------------------------------


def test_compress_quiet_json_then_bad_input(lm: dict) -> None:
    out = json_success(llmctl(lm["root"], "-q", "compress", lm["model"], "-o", "out/c", "--prune", "0.2", "--no-speed",
                              "--json"), quiet=True)
    assert out["output"] == "out/c"
    json_error(llmctl(lm["root"], "compress", lm["model"], "-o", "out/c2", "--prune", "1.5", "--json"), 2)
    assert not (lm["root"] / "out/c2").exists()


def test_export_parity_gate_exits_3_with_the_report_then_bad_input(lm: dict) -> None:
    proc = llmctl(lm["root"], "-q", "export", lm["model"], "-o", "out/strict", "--quantize", "none", "--atol", "0",
                  "--json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    out = one_object(proc)
    assert out["passed"] is False and out["failure"] and out["rows"]
    # --quiet: no stage lines or tables; at most the gate's own failure
    assert all("parity" in line or "fail" in line for line in proc.stderr.splitlines()), proc.stderr
    json_error(llmctl(lm["root"], "export", lm["model"], "-o", "out/x", "--format", "tflite", "--json"), 2)


# --- report, env, serve ---------------------------------------------------------------------------------------


def test_report_quiet_json_then_bad_input(lm: dict) -> None:
    out = json_success(llmctl(lm["root"], "-q", "report", "runs/tiny", "--out", "rep", "--json"), quiet=True)
    assert Path(lm["root"] / out["files"]["html"]).is_file()
    json_error(llmctl(lm["root"], "report", "corpus", "--json"), 2)  # neither a run, a study nor a model dir


def test_env_quiet_json(tmp_path: Path) -> None:
    out = json_success(llmctl(tmp_path, "-q", "env", "--json"), quiet=True)
    assert out["cpu"]["cores"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_port_in_use_is_exit_2_and_quiet_serve_prints_only_its_address(lm: dict) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = llmctl(lm["root"], "-q", "serve", lm["model"], "--port", str(busy.getsockname()[1]))
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "LLMCTL_QUIET")}
    server = subprocess.Popen([sys.executable, "-m", "llmctl", "-q", "serve", lm["model"], "--port", str(port)],
                              cwd=lm["root"], env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()
                time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert out == "" and err.splitlines() == [  # the one line --quiet keeps: without it --port 0 is unreachable
        f"listening on http://127.0.0.1:{port}  (OpenAI API under /v1; GET /health, GET /metrics)"], (out, err)


# --- usage errors and bugs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["prepare", "--json"],
    ["train", "tiny.yaml", "--json", "--no-such-flag"],
    ["tune", "tune.yaml", "--jobs", "0", "--json"],
    ["eval", "runs/tiny/model", "--batch-size", "many", "--json"],
    ["compress", "runs/tiny/model", "--json"],
    ["export", "--json", "-o", "out/y"],
    ["report", "--json"],
    ["recipes", "validate", "--json"],
    ["env", "--json", "extra"],
    ["trian", "--json"],
])
def test_usage_errors_with_json_print_the_error_object_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    error = json_error(llmctl(tmp_path, *args), 2, "usage")
    assert error["message"].startswith("llmctl")  # names the command whose usage is wrong


def test_a_bug_with_json_prints_the_error_object_then_the_traceback_and_exits_1(tmp_path: Path) -> None:
    code = (
        "import sys, llmctl.training.environment as environment\n"
        "def broken():\n"
        "    raise RuntimeError('a bug')\n"
        "environment.describe_environment = broken\n"
        "sys.argv = ['llmctl', 'env', '--json']\n"
        "from llmctl.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"error": {"message": "RuntimeError: a bug", "kind": "internal"}}
    assert "Traceback" in proc.stderr  # a bug keeps its traceback for the report


# --- a terminal -------------------------------------------------------------------------------------------------


def test_no_color_on_a_terminal_writes_no_colour_or_style_codes(lm: dict) -> None:
    """NO_COLOR drops every colour and text style (SGR codes); the bars still redraw in place on a terminal."""
    import pty
    import select

    main, child = pty.openpty()
    base = {k: v for k, v in os.environ.items() if k not in ("LLMCTL_QUIET", "CI")}
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "prepare", "tiny.yaml", "--force"], cwd=lm["root"],
                            env={**base, "NO_COLOR": "1", "COLUMNS": "100"}, stdout=subprocess.PIPE, stderr=child)
    os.close(child)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 0.2)
        chunk = b""
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                pass
        seen += chunk
        if not chunk and proc.poll() is not None:
            break
    os.close(main)
    assert proc.wait() == 0 and b"3 files" in seen
    assert not re.search(rb"\x1b\[[0-9;]*m", seen), seen
    assert b"encoding" in seen  # the bars were drawn
