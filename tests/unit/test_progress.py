"""Progress of long work: plain lines with ETA without a terminal, counts from the engines that report them."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from llmctl.cli.output import err_console
from llmctl.cli.progress import WorkProgress, eta_of, format_amount, format_seconds
from llmctl.progress import Progress, read_ahead


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(Progress):
    """Every stage and update, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def stage(self, text: str, unit: str = "") -> None:
        self.events.append(("stage", text, unit))

    def update(self, done: float, total: float | None = None) -> None:
        self.events.append(("update", done, total))

    def updates_of(self, text_start: str) -> list[tuple]:
        """The updates that followed the stage whose text starts with `text_start`."""
        out, inside = [], False
        for event in self.events:
            if event[0] == "stage":
                inside = event[1].startswith(text_start)
            elif inside:
                out.append(event[1:])
        return out


def test_eta_and_amount_formats() -> None:
    assert eta_of(25, 100, 10.0) == "30s"  # 75 left at 2.5 per second
    assert eta_of(1, 100, 2.0) == "3m18s"
    assert eta_of(0, 100, 5.0) == "?" and eta_of(5, None, 5.0) == "?"
    assert format_seconds(7322) == "2h02m"
    assert format_amount(4, 11, "steps") == "4/11 steps (36%)"
    assert format_amount(3.1e6, 31e6, "bytes") == "3.1/31.0 MB (10%)"
    assert format_amount(0, None, "tokens") == ""


def test_plain_lines_give_counts_and_eta_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_PROGRESS_EVERY_S", "10")
    clock = FakeClock()
    with err_console.capture() as captured:
        with WorkProgress(clock=clock) as progress:
            progress.stage("verifying", unit="steps")
            clock.now += 4
            progress.update(2, 11)  # before the interval: no line
            clock.now += 6
            progress.update(4, 11)  # 10 s in, 4 of 11 done: 7 left at 0.4 per second, 17.5 s
            clock.now += 1
            progress.update(5, 11)  # 1 s after the last line: no line
    lines = [line for line in captured.get().splitlines() if line.strip()]
    assert lines[0].endswith("verifying") and lines[0].strip().startswith("0.0s")
    assert lines[1].strip() == "10.0s   4/11 steps (36%), eta 17s"
    assert len(lines) == 2
    assert "\x1b[" not in captured.get()


def test_a_stage_that_counts_nothing_still_says_it_runs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("LLMCTL_PROGRESS_EVERY_S", "0.5")
    with WorkProgress() as progress:  # the heartbeat thread prints: rich's capture() is per thread, capsys is not
        progress.stage("exporting the graph")
        time.sleep(1.6)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("exporting the graph")
    assert any(line.endswith("running for 1s") for line in lines[1:]) and 2 <= len(lines) <= 4


def test_read_ahead_counts_every_byte(tmp_path) -> None:
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    files[0].write_bytes(b"x" * 1000)
    files[1].write_bytes(b"y" * 24)
    seen: list[tuple] = []
    assert read_ahead(files, lambda done, total: seen.append((done, total)), chunk_bytes=256) == 1024
    assert seen[0] == (0, 1024) and seen[-1] == (1024, 1024)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 1 + 4 + 1


def _tiny_gpt():
    from llmctl.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context_length=32)).eval()


def test_quantization_counts_every_tensor() -> None:
    from llmctl.compression.quantization import quantize_model
    from llmctl.models.quantized import decoder_linear_names

    model = _tiny_gpt()
    total = len(decoder_linear_names(model)) + 2
    seen: list[tuple] = []
    quantize_model(model, "int8-weight", on_progress=lambda done, t: seen.append((done, t)))
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_parity_counts_its_steps() -> None:
    from llmctl.tasks.lm.parity import verify_parity

    model = _tiny_gpt()
    seen: list[tuple] = []
    with torch.no_grad():
        result = verify_parity(model, model, on_progress=lambda done, total: seen.append((done, total)))
    assert result.passed
    total = seen[0][1]
    assert [d for d, _ in seen] == list(range(1, total + 1)) and all(t == total for _, t in seen)


def test_profiling_reports_timing_and_perplexity_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import llmctl.evaluation.profile as profile

    monkeypatch.setattr(profile, "stored_parameters", lambda loaded: (1, 1))  # figures read from files on disk
    monkeypatch.setattr(profile, "weights_files", lambda loaded: [])
    loaded = SimpleNamespace(model=_tiny_gpt(), config={"vocab_size": 64}, path="unused", provenance={})
    tokens = np.arange(200, dtype=np.int64) % 64
    recorder = Recorder()
    rows = profile.profile_models([loaded, loaded], tokens, np.ones(64, dtype=np.int64), ["a", "b"], progress=recorder)
    assert [r.tokens_scored for r in rows] == [199, 199]
    assert recorder.updates_of("timing 2 models")[-1] == (6, 6)  # 3 rounds x 2 models
    assert recorder.updates_of("perplexity of a")[-1] == (199, 199)
    assert recorder.updates_of("perplexity of b")[-1] == (199, 199)
