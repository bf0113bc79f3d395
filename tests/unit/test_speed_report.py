"""How compress and eval --compare report speed: a slowdown reads as one, the help does not promise int8 is always
faster, and a timing another process disturbed is marked."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from llmctl.cli.compress import compression_table
from llmctl.compression.summary import speed_change
from llmctl.tasks import task_named


def report_table(report: dict):
    return compression_table(report, task_named("lm"))


def classifier_report_table(report: dict):
    return compression_table(report, task_named("classification"))


def _render(table) -> str:
    console = Console(width=160, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def _side(forward_ms: float, tokens_per_s: float) -> dict:
    return {"parameters": 1000, "nonzero_parameters": 1000, "size_bytes": 4000, "perplexity": 40.0,
            "forward_ms": forward_ms, "forward_tokens": 128, "generate_tokens_per_s": tokens_per_s}


def test_a_slowdown_is_printed_as_one():
    assert speed_change(2.0) == "2.00× faster"
    assert speed_change(0.69) == "1.45× slower"
    assert speed_change(None) == "-"
    text = _render(report_table({"before": _side(2.0, 1000.0), "after": _side(2.9, 690.0)}))
    assert "1.45× slower" in text  # forward: 2.9 ms against 2.0 ms
    assert text.count("slower") == 2 and "faster" not in text  # generation: 690 tokens/s against 1000


def test_a_classifier_slowdown_is_printed_as_one():
    side = {"parameters": 10, "nonzero_parameters": 10, "size_bytes": 40, "examples": 8, "accuracy": 1.0,
            "macro_f1": 1.0, "forward_batch": 32, "forward_tokens": 20}
    text = _render(classifier_report_table({"before": {**side, "forward_ms": 1.0}, "after": {**side, "forward_ms": 2.0}}))
    assert "2.00× slower" in text


def test_quantize_help_says_when_int8_pays():
    from typer.testing import CliRunner

    from llmctl.cli import app

    result = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    help_text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert "fastest" not in help_text
    assert "pays on large matmuls" in help_text and "not on tiny ones" in help_text


# --- timings disturbed by another process ------------------------------------------------------------------


def test_rounds_that_disagree_mark_a_model_as_disturbed(monkeypatch):
    from llmctl.evaluation import speed

    forwards = iter([2.0, 2.1, 9.0, 2.0, 2.05, 2.1])  # round by round: model A, model B
    monkeypatch.setattr(speed, "forward_latency_ms", lambda *a, **k: next(forwards))
    monkeypatch.setattr(speed, "generation_tokens_per_s", lambda *a, **k: 500.0)
    a, b = speed.measure_speeds(["A", "B"], 16, 32, rounds=3)
    assert a.spread == 9.0 / 2.0 and speed.is_disturbed(a.spread)  # A's second round was crowded out
    assert b.spread < 1.1 and not speed.is_disturbed(b.spread)
    assert a.forward_ms == 2.05  # the median keeps the figure close to the quiet rounds


def test_a_classifier_round_that_disagrees_is_marked(monkeypatch):
    from llmctl.tasks.classification import profile as classifier_pipeline

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(classifier_pipeline, "time", clock)
    costs = {"quiet": iter([0.001] * 100), "crowded": iter([0.001] * 7 + [0.004] * 5 + [0.001] * 100)}

    def model(name):
        def forward(ids, lengths):
            clock.now += next(costs[name])
        return forward

    (quiet_ms, quiet_spread), (_, crowded_spread) = classifier_pipeline.classifier_latency_ms(
        [model("quiet"), model("crowded")], None, None, rounds=3, reps=5, warmup=2)
    assert quiet_ms == pytest.approx(1.0) and quiet_spread == pytest.approx(1.0)
    assert crowded_spread == pytest.approx(4.0)  # its second round ran 4x slower


def test_eval_compare_marks_disturbed_rows_and_says_why():
    from llmctl.cli.eval_tables import compare_table

    row = {"name": "runs/a/model", "backend": "torch", "perplexity": 40.0, "perplexity_change_pct": 0.0,
           "size_bytes": 5_000_000, "forward_ms": 21.06, "generate_tokens_per_s": 900.0,
           "timing_spread": 1.02, "timing_disturbed": False}
    crowded = {**row, "name": "out/a-copy", "forward_ms": 110.99, "timing_spread": 5.3, "timing_disturbed": True}
    text = _render(compare_table({"source": "data/a (val)", "tokens": 1000, "rows": [row, crowded]}))
    assert "110.99 *" in text and "21.06 *" not in text
    assert "* timing disturbed: its rounds differ by up to 5.3x" in " ".join(text.split())
    quiet = _render(compare_table({"source": "data/a (val)", "tokens": 1000, "rows": [row]}))
    assert "disturbed" not in quiet and "*" not in quiet
