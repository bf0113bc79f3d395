"""llmctl.reporting on hand-made inputs: a metrics.jsonl written here, an Optuna study built in-process and
compare figures typed in. Every PNG is checked for drawn data, every page for being self-contained."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import EXIT_BAD_INPUT, LlmctlError
from llmctl.reporting.layout import ReportFiles, next_compare_dir
from llmctl.reporting.plots import SECOND, TRAIN, VAL, model_colour
from llmctl.tasks import task_named

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- checks shared with tests/integration/test_report.py ------------------------------------------------


def colour_pixels(png: Path, colour: str, tol: float = 0.06) -> int:
    """Pixels of `png` within `tol` (per channel, 0..1) of `colour`: a series' line or markers."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    return int((np.abs(img - np.asarray(to_rgb(colour))).max(axis=-1) < tol).sum())


def saturated_pixels(png: Path) -> int:
    """Pixels of a clearly coloured (not grey, white or black) shade: data, where axes and text are grey."""
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    return int(((img.max(axis=-1) - img.min(axis=-1)) > 0.3).sum())


def assert_png(path: Path) -> None:
    assert Path(path).is_file(), path
    assert Path(path).read_bytes()[:8] == PNG_MAGIC, path


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs.extend(v or "" for k, v in attrs if k in ("src", "href"))


def assert_self_contained(page: Path, plots: dict[str, str]) -> None:
    """report.html parses, fetches nothing (no script, no stylesheet link, no remote URL) and embeds each plot."""
    text = Path(page).read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(text)
    parser.close()
    assert parser.tags[0] == "html" and "body" in parser.tags
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "http://" not in text and "https://" not in text
    embedded = []
    for ref in parser.refs:
        assert not ref.startswith("//"), ref
        if ref.startswith("data:"):
            assert ref.startswith("data:image/png;base64,"), ref[:40]
            embedded.append(base64.b64decode(ref.split(",", 1)[1]))
        else:
            assert "/" not in ref and (Path(page).parent / ref).is_file(), ref  # a file beside the page
    assert sorted(embedded) == sorted(Path(p).read_bytes() for p in plots.values())


# --- a run dir written by hand ----------------------------------------------------------------------------


def lm_rows(steps: int = 60, eval_every: int = 10) -> list[dict]:
    rows, tokens = [], 0
    for step in range(1, steps + 1):
        tokens += 256
        rows.append({"step": step, "tokens": tokens, "loss": round(5 * math.exp(-step / 20) + 1 + 0.05 * (step % 3), 6),
                     "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 1 + 0.1 * (step % 7), "tokens_per_s": 1000.0 + step,
                     "elapsed_s": round(0.1 * step, 3)})
        if step % eval_every == 0:
            # lowest at step 40, then rising again: the best is not the last
            val = 1.5 + 0.002 * (step - 40) ** 2
            rows.append({"step": step, "tokens": tokens, "val_loss": val, "val_ppl": math.exp(val),
                         "best_val_loss": val, "elapsed_s": round(0.1 * step + 0.05, 3)})
    return rows


def write_run(run_dir: Path, rows: list[dict], tail: str = "", task: str = "lm") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(f"run: {{name: hand}}\ndata: {{task: {task}}}\n", encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return run_dir


@pytest.fixture
def lm_run(tmp_path: Path) -> Path:
    rows = lm_rows()
    rows.insert(30, {"step": 30, "event": "nonfinite_skipped", "skipped": 1})
    return write_run(tmp_path / "runs" / "hand", rows, tail='{"step": 61, "tokens": 1')  # torn by a crash


def test_run_summary_matches_metrics_jsonl(lm_run: Path) -> None:
    from llmctl.reporting.runs import read_run_metrics, summarize_run

    rows = lm_rows()
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    s = summarize_run(read_run_metrics(lm_run))
    assert s["task"] == "lm" and s["steps"] == 60 and s["evals"] == 6
    assert s["final_loss"] == steps[-1]["loss"]
    assert s["tokens"] == steps[-1]["tokens"] == 60 * 256
    assert s["elapsed_s"] == max(r["elapsed_s"] for r in rows)
    assert s["best_val_loss"] == min(r["val_loss"] for r in evals) == pytest.approx(1.5)
    assert s["best_val_step"] == 40 and s["best_val_ppl"] == pytest.approx(math.exp(1.5))
    assert s["final_val_loss"] == evals[-1]["val_loss"]


def test_run_report_draws_every_series_and_embeds_it_in_a_self_contained_page(lm_run: Path, tmp_path: Path) -> None:
    from llmctl.reporting.runs import report_run

    result = report_run(lm_run, tmp_path / "out")
    plots = result["files"]["plots"]
    assert set(plots) == {"loss", "lr", "throughput", "grad-norm"}
    for path in plots.values():
        assert_png(Path(path))
        assert Path(path).parent == tmp_path / "out"
    # Two panels (steps, tokens), each with a train line across the axes and a val line with markers.
    assert colour_pixels(Path(plots["loss"]), TRAIN) > 1000
    assert colour_pixels(Path(plots["loss"]), VAL) > 600
    for name in ("lr", "throughput", "grad-norm"):
        assert colour_pixels(Path(plots[name]), TRAIN) > 400, name
    assert_self_contained(Path(result["files"]["html"]), plots)
    assert not (lm_run / "report.html").exists()  # --out given: the run dir is left as it was


def test_the_pixel_check_sees_nothing_on_empty_axes(tmp_path: Path) -> None:
    from llmctl.reporting.plots import new_figure, save_png

    fig, (ax,) = new_figure()
    ax.set_xlabel("optimizer step")
    ax.set_title("empty")
    empty = save_png(fig, tmp_path / "empty.png")
    assert colour_pixels(empty, TRAIN) == 0 and colour_pixels(empty, VAL) == 0 and saturated_pixels(empty) == 0


def test_the_report_goes_into_the_run_dir_by_default_beside_its_metrics(lm_run: Path) -> None:
    from llmctl.reporting.runs import report_run

    result = report_run(lm_run)
    assert Path(result["files"]["html"]) == ReportFiles(lm_run).html
    assert (lm_run / "report-loss.png").is_file()
    assert "hand" in (lm_run / "report.html").read_text(encoding="utf-8")  # recipe.yaml shown on the page


def test_a_classifier_run_reports_accuracy_and_f1(tmp_path: Path) -> None:
    from llmctl.reporting.runs import report_run

    rows = []
    for step in range(5, 105, 5):
        rows.append({"step": step, "tokens": step * 300, "loss": 0.7 - step / 300, "lr": 1e-3, "grad_norm": 0.5,
                     "tokens_per_s": 20000.0, "elapsed_s": step / 50, "examples": step * 32})
        if step % 20 == 0:
            acc = 0.5 + step / 250 if step != 80 else 0.95
            rows.append({"step": step, "tokens": step * 300, "val_loss": 0.7 - step / 400, "val_accuracy": acc,
                         "val_f1": acc - 0.01, "val_precision": acc, "val_recall": acc, "elapsed_s": step / 50,
                         "examples": step * 32, "best_val_loss": 0.5, "best_val_f1": 0.9})
    result = report_run(write_run(tmp_path / "cls", rows, task="classification"))
    assert result["task"] == "classifier" and result["examples"] == 100 * 32
    assert result["best_val_accuracy"] == 0.95 and result["best_val_accuracy_step"] == 80
    assert result["best_val_f1"] == pytest.approx(0.94) and result["best_val_f1_step"] == 80
    assert result["best_val_loss"] == pytest.approx(0.7 - 100 / 400) and result["best_val_step"] == 100
    assert "val_ppl" not in result and "final_val_ppl" not in result
    val = Path(result["files"]["plots"]["val-metrics"])
    assert colour_pixels(val, VAL) > 300 and colour_pixels(val, SECOND) > 300


@pytest.mark.parametrize(
    ("content", "needle"),
    [("", "empty"), ('{"step": 3, "event": "out_of_memory"}\n', "no step rows"), ("not json\n", "no step rows")],
)
def test_a_metrics_file_without_rows_is_refused_as_bad_input(tmp_path: Path, content: str, needle: str) -> None:
    from llmctl.reporting.runs import report_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(LlmctlError) as e:
        report_run(run)
    assert e.value.exit_code == EXIT_BAD_INPUT and needle in e.value.message and "metrics.jsonl" in e.value.message
    assert not (run / "report.html").exists()


def test_a_dir_without_metrics_is_refused(tmp_path: Path) -> None:
    from llmctl.reporting.runs import report_run

    with pytest.raises(LlmctlError, match="no metrics.jsonl"):
        report_run(tmp_path)


def test_format_seconds() -> None:
    from llmctl.reporting.runs import format_seconds

    assert format_seconds(2.6) == "2.6 s" and format_seconds(125) == "2 min 05 s" and format_seconds(3 * 3600 + 60) == "3 h 01 min"


# --- a study built in-process -----------------------------------------------------------------------------


def build_study(study_dir: Path, *, summary: bool = True) -> object:
    """A study as `tune` leaves it: a SQLite storage in the dir; complete, pruned and failed trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="unit", storage=f"sqlite:///{study_dir / 'study.db'}",
                                sampler=optuna.samplers.RandomSampler(seed=1))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("train.lr", 1e-4, 1.0, log=True)
        layers = trial.suggest_int("model.n_layer", 1, 4)
        optimizer = trial.suggest_categorical("train.optimizer", ["adamw", "sgd"])
        value = (math.log10(lr) + 2) ** 2 + 0.1 * layers + (0.3 if optimizer == "sgd" else 0.0)
        for step in (5, 10):
            trial.report(value + 1 / step, step)
        if trial.number == 3:
            raise optuna.TrialPruned()
        if trial.number == 5:
            raise ValueError("diverged")
        return value

    study.optimize(objective, n_trials=10, catch=(ValueError,))
    if summary:
        (study_dir / "summary.json").write_text(json.dumps({"study": "unit", "objective": "val_loss"}), encoding="utf-8")
    (study_dir / "best.yaml").write_text("# best trial\nrun: {name: unit-best}\n", encoding="utf-8")
    return study


def test_study_report_names_the_best_trial_and_draws_four_plots(tmp_path: Path) -> None:
    from llmctl.reporting.studies import report_study

    study = build_study(tmp_path / "runs" / "unit")
    result = report_study(tmp_path / "runs" / "unit")
    assert result["trials"] == {"complete": 8, "pruned": 1, "fail": 1, "running": 0, "waiting": 0}
    assert result["best"]["number"] == study.best_trial.number
    assert result["best"]["value"] == pytest.approx(study.best_value)
    assert result["best"]["params"] == study.best_trial.params
    assert result["objective"] == "val_loss" and result["direction"] == "minimize"
    plots = result["files"]["plots"]
    assert set(plots) == {"history", "importances", "parallel", "curves"}
    for name, path in plots.items():
        assert_png(Path(path))
        assert saturated_pixels(Path(path)) > 500, name  # empty axes: 0
    assert colour_pixels(Path(plots["parallel"]), VAL) > 300  # the best trial's line across every axis
    assert_self_contained(Path(result["files"]["html"]), plots)
    page = Path(result["files"]["html"]).read_text(encoding="utf-8")
    assert "unit-best" in page  # best.yaml shown


def test_report_leaves_tunes_own_plots_alone(tmp_path: Path) -> None:
    from llmctl.reporting.studies import report_study

    build_study(tmp_path / "s")
    (tmp_path / "s" / "history.png").write_bytes(b"tune's own")
    report_study(tmp_path / "s")
    assert (tmp_path / "s" / "history.png").read_bytes() == b"tune's own"
    assert (tmp_path / "s" / "report-history.png").is_file()


def test_a_study_without_summary_json_is_found_by_its_only_study(tmp_path: Path) -> None:
    from llmctl.reporting.studies import report_study

    build_study(tmp_path / "s", summary=False)
    result = report_study(tmp_path / "s", tmp_path / "out")
    assert result["study"] == "unit" and result["objective"] == "objective"


def test_a_study_whose_storage_is_gone_is_refused_and_not_recreated(tmp_path: Path) -> None:
    from llmctl.reporting.studies import report_study

    study_dir = tmp_path / "s"
    study_dir.mkdir()
    gone = tmp_path / "elsewhere" / "study.db"
    (study_dir / "spec.json").write_text(json.dumps({"storage": f"sqlite:///{gone}"}), encoding="utf-8")
    with pytest.raises(LlmctlError, match="missing") as e:
        report_study(study_dir)
    assert e.value.exit_code == EXIT_BAD_INPUT and not gone.exists()


def test_a_study_with_no_completed_trial_says_so_instead_of_drawing(tmp_path: Path) -> None:
    import optuna

    from llmctl.reporting.studies import report_study

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="none", storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial({})
    study.ask()  # one running trial
    result = report_study(tmp_path)
    assert result["best"] is None and result["trials"]["running"] == 1 and result["files"]["plots"] == {}
    assert "nothing to plot" in Path(result["files"]["html"]).read_text(encoding="utf-8")


# --- compare figures typed in -----------------------------------------------------------------------------


LM_COMPARE = {
    "source": "data/tiny (val)", "tokens": 4096,
    "rows": [
        {"name": "runs/a/model", "backend": "torch", "size_bytes": 4_000_000, "perplexity": 20.0, "forward_ms": 3.0,
         "generate_tokens_per_s": 500.0, "perplexity_change_pct": 0.0},
        {"name": "out/a-int8", "backend": "torch-int8", "size_bytes": 1_100_000, "perplexity": 20.4, "forward_ms": 2.0,
         "generate_tokens_per_s": 700.0, "perplexity_change_pct": 2.0},
        {"name": "out/a-onnx", "backend": "onnxruntime", "size_bytes": 4_100_000, "perplexity": 20.0, "forward_ms": 1.5,
         "generate_tokens_per_s": 900.0, "perplexity_change_pct": 0.0},
        {"name": "out/a-onnx", "backend": "onnxruntime-int8", "size_bytes": 1_200_000, "perplexity": 20.6,
         "forward_ms": None, "generate_tokens_per_s": None, "perplexity_change_pct": 3.0},
    ],
}

CLASSIFIER_COMPARE = {
    "source": "data/sentiment (val)", "examples": 1200,
    "rows": [
        {"name": "runs/s/model", "backend": "torch", "size_bytes": 90_000, "accuracy": 0.96, "macro_f1": 0.955,
         "forward_ms": 0.5, "forward_batch": 32, "forward_tokens": 17},
        {"name": "out/s-int8", "backend": "torch-int8", "size_bytes": 30_000, "accuracy": 0.95, "macro_f1": 0.948,
         "forward_ms": 0.4, "forward_batch": 32, "forward_tokens": 17},
    ],
}


def test_compare_plots_size_and_latency_against_perplexity(tmp_path: Path) -> None:
    from llmctl.reporting.compare import report_compare

    result = report_compare(LM_COMPARE, tmp_path / "c", task_named("lm"))
    plots = result["files"]["plots"]
    assert set(plots) == {"size-vs-perplexity", "latency-vs-perplexity"}
    for i in range(4):  # each model in its own colour: its point and its legend entry
        assert colour_pixels(Path(plots["size-vs-perplexity"]), model_colour(i)) > 80, i
    assert colour_pixels(Path(plots["latency-vs-perplexity"]), model_colour(3)) == 0  # the int8 graph was not timed
    assert result["rows"] == LM_COMPARE["rows"] and result["kind"] == "compare" and result["task"] == "lm"
    assert_self_contained(Path(result["files"]["html"]), plots)
    page = Path(result["files"]["html"]).read_text(encoding="utf-8")
    assert "out/a-int8" in page and "20.400" in page and "+2.00" in page


def test_compare_of_classifiers_plots_accuracy_and_macro_f1(tmp_path: Path) -> None:
    from llmctl.reporting.compare import report_compare

    result = report_compare(CLASSIFIER_COMPARE, tmp_path / "c", task_named("classification"))
    plots = result["files"]["plots"]
    assert set(plots) == {"size-vs-accuracy", "latency-vs-accuracy"}
    for path in plots.values():
        assert colour_pixels(Path(path), model_colour(0)) > 80 and colour_pixels(Path(path), model_colour(1)) > 80
    assert_self_contained(Path(result["files"]["html"]), plots)


def _drawn_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Keep each figure the reporting code saves, by file stem, so a test can read its axes and legend."""
    from llmctl.reporting import plots as plots_module

    figures: dict[str, object] = {}
    save = plots_module.save_png

    def keep(fig, path):
        figures[Path(path).stem] = fig
        return save(fig, path)

    monkeypatch.setattr(plots_module, "save_png", keep)
    return figures


def test_compare_plots_name_every_model_in_a_legend_with_its_own_colour(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.colors import to_hex

    from llmctl.reporting.compare import report_compare

    figures = _drawn_figures(monkeypatch)
    copy = {**LM_COMPARE["rows"][0], "name": "out/a-copy", "timing_spread": 4.2, "timing_disturbed": True}
    result = report_compare({**LM_COMPARE, "rows": [*LM_COMPARE["rows"], copy]}, tmp_path / "c", task_named("lm"))
    (ax,) = figures["report-size-vs-perplexity"].axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["runs/a/model", "out/a-int8", "out/a-onnx [onnxruntime]", "out/a-onnx [onnxruntime-int8]", "out/a-copy"]
    assert len(ax.texts) == 0  # no label is written beside a point, so none can cover another
    points = {to_hex(c.get_facecolor()[0]): (c.get_offsets()[0].tolist(), c.get_sizes()[0]) for c in ax.collections}
    assert len(points) == 5  # five colours
    # runs/a/model and its copy share a place: the first is drawn larger, around the second, so both show.
    (xy_a, size_a), (xy_copy, size_copy) = points[model_colour(0)], points[model_colour(4)]
    assert xy_a == xy_copy and size_a > size_copy
    assert ax.get_xlabel() == "weights on disk (MiB)"  # the table's sizes are MiB too (human_bytes)
    (latency,) = figures["report-latency-vs-perplexity"].axes
    assert "out/a-copy (timing disturbed)" in [t.get_text() for t in latency.get_legend().get_texts()]
    page = Path(result["files"]["html"]).read_text(encoding="utf-8")
    assert "3.00 *" in page and "timing disturbed" in page


def test_classifier_compare_legend_names_models_and_the_two_scores(tmp_path: Path, monkeypatch) -> None:
    from llmctl.reporting.compare import report_compare

    figures = _drawn_figures(monkeypatch)
    report_compare(CLASSIFIER_COMPARE, tmp_path / "c", task_named("classification"))
    (ax,) = figures["report-size-vs-accuracy"].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["runs/s/model", "out/s-int8", "accuracy", "macro-F1"]
    assert ax.get_xlabel() == "weights on disk (KiB)"  # 90 KB: small models read in KiB


def test_the_confusion_matrix_colour_bar_says_what_it_counts() -> None:
    from llmctl.evaluation.classification import confusion_figure

    fig = confusion_figure({"labels": ["neg", "pos"], "confusion": [[50, 3], [4, 43]], "examples": 100})
    matrix, colour_bar = fig.axes
    assert matrix.get_xlabel() == "predicted" and colour_bar.get_ylabel() == "examples in the cell"


def test_compare_dirs_are_numbered_so_none_is_overwritten(tmp_path: Path) -> None:
    assert next_compare_dir(tmp_path) == tmp_path / "compare-1"
    (tmp_path / "compare-1").mkdir()
    (tmp_path / "compare-2").mkdir()
    assert next_compare_dir(tmp_path) == tmp_path / "compare-3"


def test_out_naming_a_file_is_refused(tmp_path: Path, lm_run: Path) -> None:
    from llmctl.reporting.runs import report_run

    (tmp_path / "taken").write_text("x")
    with pytest.raises(LlmctlError, match="existing file"):
        report_run(lm_run, tmp_path / "taken")


# --- the command, on the hand-made run and study (no torch needed) ----------------------------------------


def llmctl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_report_json_is_one_object_with_the_figures_and_files(lm_run: Path, tmp_path: Path) -> None:
    proc = llmctl(tmp_path, "report", "runs/hand", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kind"] == "run" and out["best_val_loss"] == pytest.approx(1.5) and out["best_val_step"] == 40
    assert out["tokens"] == 60 * 256 and out["final_loss"] == lm_rows()[-2]["loss"]
    assert out["files"]["html"] == "runs/hand/report.html" and (tmp_path / out["files"]["plots"]["loss"]).is_file()
    assert "lowest val loss" in proc.stderr and "1.5000 at step 40" in proc.stderr  # the table, on stderr with --json


def test_report_of_a_study_dir_prints_the_best_trial(tmp_path: Path) -> None:
    study = build_study(tmp_path / "runs" / "unit")
    proc = llmctl(tmp_path, "report", "runs/unit")
    assert proc.returncode == 0, proc.stderr
    words = " ".join(proc.stdout.split())
    assert f"best trial {study.best_trial.number}: val_loss" in words and "8 complete, 1 pruned, 1 fail" in words


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("nowhere",), "nowhere: no such directory"),
        (("runs/hand/metrics.jsonl",), "a file; give the run dir"),
        (("runs",), "runs: not a run dir"),
        (("runs/hand", "runs/hand"), "several paths are compared as model dirs"),
        (("runs/hand", "--data", "data/x"), "--data: for a compare of model dirs"),
        (("empty",), "empty/metrics.jsonl: empty"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_a_json_error(lm_run: Path, tmp_path: Path, args: tuple, needle: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    proc = llmctl(tmp_path, "report", *args, "--json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert needle in json.loads(proc.stdout)["error"]["message"]
    assert needle in " ".join(proc.stderr.split())
