"""The report of one run dir: its metrics.jsonl summed up and drawn (loss, lr, throughput, gradient norm),
and what its task adds (`RUN` of `llmctl.tasks.<task>.reporting`: a classifier's accuracy and F1)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.artifacts import RunDir, iter_jsonl
from llmctl.errors import LlmctlError
from llmctl.reporting.html import Page, Plot, write_page
from llmctl.reporting.layout import ReportFiles
from llmctl.tasks import Task, task_of


@dataclass
class RunMetrics:
    """The rows of a metrics.jsonl, split by kind and sorted by step, and the run's task."""

    source: Path
    steps: list[dict[str, Any]]  # training rows: step, tokens, loss, lr, grad_norm, tokens_per_s, elapsed_s
    evals: list[dict[str, Any]]  # eval rows: step, tokens, val_loss, val_ppl or val_accuracy/val_f1/..., elapsed_s
    task: Task

    @property
    def panels(self) -> Any:
        """What the task adds to the report (reporting.panels.RunPanels)."""
        return self.task.reporting.RUN


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run_metrics(run_dir: Path) -> RunMetrics:
    """Read a run dir's metrics.jsonl; refuse a dir without one, or one with no step or eval row."""
    rd = RunDir(Path(run_dir))
    if not rd.metrics.is_file():
        raise LlmctlError(f"{rd.path}: no metrics.jsonl; a run dir is what `llmctl train` writes to runs/<name>/.")
    rows = [r for r in iter_jsonl(rd.metrics) if isinstance(r, dict) and is_number(r.get("step")) and "event" not in r]
    steps = sorted((r for r in rows if is_number(r.get("loss"))), key=lambda r: r["step"])
    evals = sorted((r for r in rows if is_number(r.get("val_loss"))), key=lambda r: r["step"])
    if not steps and not evals:
        if not rd.metrics.read_text(encoding="utf-8", errors="replace").strip():
            raise LlmctlError(f"{rd.metrics}: empty; the run has logged no step yet (it logs every train.log_every steps).")
        raise LlmctlError(
            f"{rd.metrics}: no step rows (step, loss, ...) or eval rows (step, val_loss, ...); "
            "is this the metrics.jsonl of `llmctl train`?"
        )
    return RunMetrics(rd.metrics, steps, evals, task_of(rd.path))


def best_row(rows: list[dict[str, Any]], key: str, *, highest: bool) -> dict[str, Any] | None:
    """The earliest row with the lowest (or highest) finite `key`."""
    scored = [r for r in rows if is_number(r.get(key)) and math.isfinite(r[key])]
    if not scored:
        return None
    return (max if highest else min)(scored, key=lambda r: r[key])


def summarize_run(metrics: RunMetrics) -> dict[str, Any]:
    """The run's headline figures: steps, tokens, seconds, final and best losses, then its task's."""
    rows = metrics.steps + metrics.evals
    last_step = metrics.steps[-1] if metrics.steps else None
    last_eval = metrics.evals[-1] if metrics.evals else None
    best = best_row(metrics.evals, "val_loss", highest=False)
    speeds = [r["tokens_per_s"] for r in metrics.steps if is_number(r.get("tokens_per_s"))]
    summary: dict[str, Any] = {
        "task": metrics.panels.label,
        "steps": max(r["step"] for r in rows),
        "tokens": max((r["tokens"] for r in rows if is_number(r.get("tokens"))), default=None),
        "elapsed_s": max((r["elapsed_s"] for r in rows if is_number(r.get("elapsed_s"))), default=None),
        "final_loss": last_step["loss"] if last_step else None,
        "evals": len(metrics.evals),
        "final_val_loss": last_eval["val_loss"] if last_eval else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
    }
    return {**summary, **metrics.panels.summarize(metrics, summary)}


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"


def _g(value: Any, digits: int = 4) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}")


def run_facts(summary: dict[str, Any], panels: Any) -> list[tuple[str, str]]:
    """The summary as (label, text) lines, for the HTML page and the terminal alike (`examples` and a
    lowest loss's perplexity where the task's summary has them, its own lines before the throughput)."""
    facts = [
        ("steps", _g(summary["steps"])),
        ("tokens", _g(summary["tokens"])),
        *([("examples", _g(summary["examples"]))] if summary.get("examples") is not None else []),
        ("time", format_seconds(summary["elapsed_s"])),
        ("final train loss", _g(summary["final_loss"])),
        ("final val loss", _g(summary["final_val_loss"])),
    ]
    if summary["best_val_loss"] is not None:
        ppl = f", perplexity {summary['best_val_ppl']:.3f}" if summary.get("best_val_ppl") is not None else ""
        facts.append(("lowest val loss", f"{summary['best_val_loss']:.4f} at step {summary['best_val_step']:,}{ppl}"))
    facts += panels.facts(summary)
    if summary["median_tokens_per_s"] is not None:
        facts.append(("throughput", f"{summary['median_tokens_per_s']:,.0f} tokens/s (median)"))
    return facts


def column(rows: list[dict[str, Any]], key: str) -> list[Any]:
    return [r.get(key) for r in rows]


def plot_run(metrics: RunMetrics, files: ReportFiles) -> list[Plot]:
    """Loss against steps and tokens, learning rate, tokens/s, gradient norm, then the task's plots."""
    from llmctl.reporting.plots import TRAIN, VAL, finite, log_if_wide, new_figure, save_png

    steps, evals = metrics.steps, metrics.evals
    plots: list[Plot] = []

    have_tokens = any(is_number(r.get("tokens")) for r in steps + evals)
    fig, axes = new_figure(2 if have_tokens else 1)
    for ax, x in zip(axes, ("step", "tokens")):
        ax.plot(*finite(column(steps, x), column(steps, "loss")), color=TRAIN, lw=1.5, label="train loss",
                marker="o" if len(steps) == 1 else None)
        if evals:
            ax.plot(*finite(column(evals, x), column(evals, "val_loss")), color=VAL, lw=1.5, marker="o", ms=4, label="val loss")
        ax.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
        ax.set_ylabel(f"loss (nats per {metrics.panels.loss_unit})")
        ax.set_title(f"loss against {'tokens' if x == 'tokens' else 'steps'}")
        ax.legend()
    plots.append(Plot("Loss", save_png(fig, files.plot("loss")), "Training loss (mean over each logging window) and validation loss."))

    single = [
        ("lr", "learning rate", "lr", "Learning rate", "The schedule's learning rate at each logged step."),
        ("tokens_per_s", "tokens per second", "throughput", "Throughput", "Training tokens per second over each logging window."),
        ("grad_norm", "gradient norm", "grad-norm", "Gradient norm", "Global gradient norm before clipping."),
    ]
    for key, label, name, title, caption in single:
        xs, ys = finite(column(steps, "step"), column(steps, key))
        if not ys:
            continue
        fig, (ax,) = new_figure()
        ax.plot(xs, ys, color=TRAIN, lw=1.5, marker="o" if len(xs) == 1 else None)
        if key == "grad_norm":
            log_if_wide(ax, ys)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(title.lower())
        plots.append(Plot(title, save_png(fig, files.plot(name)), caption))

    return plots + metrics.panels.plots(metrics, files)


def report_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Write report.html and the PNG plots of a run dir (into the run dir unless `out_dir`); return the summary."""
    run_dir = Path(run_dir)
    metrics = read_run_metrics(run_dir)
    summary = summarize_run(metrics)
    files = ReportFiles(Path(out_dir) if out_dir is not None else run_dir)
    files.prepare()
    plots = plot_run(metrics, files)
    recipe = RunDir(run_dir).recipe
    page = Page(
        title=f"Run {run_dir.resolve().name}",
        subtitle=f"{run_dir} ({metrics.panels.kind}), from {metrics.source.name}",
        facts=run_facts(summary, metrics.panels),
        plots=plots,
        texts=[("recipe.yaml", recipe.read_text(encoding="utf-8"))] if recipe.is_file() else [],
    )
    write_page(files.html, page)
    return {
        "kind": "run",
        "run_dir": str(run_dir),
        **summary,
        "files": files.listing(plots),
    }
