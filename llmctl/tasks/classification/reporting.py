"""A classifier in `llmctl report`: its run's val accuracy and macro-F1 (figures and a plot), and a
compare's accuracy and macro-F1 against size and batch latency."""

from __future__ import annotations

from typing import Any

from llmctl.reporting.panels import ComparePanels, RunPanels, number, timing_mark

METRICS = ("val_accuracy", "val_f1")  # what an eval row of a classifier's metrics.jsonl scores, higher better


def _summarize(metrics: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Examples seen, and the last and best val accuracy and macro-F1 (with the step of the best)."""
    from llmctl.reporting.runs import best_row, is_number

    rows, last = metrics.steps + metrics.evals, (metrics.evals[-1] if metrics.evals else None)
    figures: dict[str, Any] = {"examples": max((r["examples"] for r in rows if is_number(r.get("examples"))), default=None)}
    for key in METRICS:
        top = best_row(metrics.evals, key, highest=True)
        figures[f"final_{key}"] = last.get(key) if last else None
        figures[f"best_{key}"] = top[key] if top else None
        figures[f"best_{key}_step"] = top["step"] if top else None
    return figures


def _facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    facts = []
    for key in METRICS:
        if summary.get(f"best_{key}") is not None:
            name = key.removeprefix("val_").replace("f1", "macro-F1")
            facts.append((f"best val {name}", f"{summary[f'best_{key}']:.4f} at step {summary[f'best_{key}_step']:,}"))
    return facts


def _plots(metrics: Any, files: Any) -> list[Any]:
    """Val accuracy and macro-F1 against steps."""
    from llmctl.reporting.html import Plot
    from llmctl.reporting.plots import SECOND, VAL, finite, new_figure, save_png
    from llmctl.reporting.runs import column

    fig, (ax,) = new_figure()
    for key, color, label in (("val_accuracy", VAL, "accuracy"), ("val_f1", SECOND, "macro-F1")):
        xs, ys = finite(column(metrics.evals, "step"), column(metrics.evals, key))
        if ys:
            ax.plot(xs, ys, color=color, lw=1.5, marker="o", ms=4, label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation score")
    ax.set_title("validation accuracy and macro-F1")
    ax.legend()
    return [Plot("Validation accuracy and F1", save_png(fig, files.plot("val-metrics")), "On the val split at each evaluation.")]


def _compare_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    from llmctl.units import human_bytes

    header = ["model", "backend", "accuracy", "macro-F1", "size", "forward ms", "batch"]
    body = [[r["name"], r["backend"], number(r["accuracy"], ".4f"), number(r["macro_f1"], ".4f"), human_bytes(r["size_bytes"]),
             number(r["forward_ms"], ".2f") + timing_mark(r),
             "-" if r["forward_batch"] is None else f"{r['forward_batch']}x{r['forward_tokens']}"] for r in rows]
    return header, body


RUN = RunPanels(label="classifier", kind="classifier", loss_unit="example", summarize=_summarize, facts=_facts,
                plots=_plots)

COMPARE = ComparePanels(
    label="classifier", models="classifiers", quality=(("accuracy", "accuracy", "o"), ("macro_f1", "macro-F1", "s")),
    quality_title="accuracy and macro-F1", y_name="accuracy", y_label="score on the val split (higher is better)",
    latency_caption=" over a batch of val texts.", scored=lambda report: f"{report['examples']:,} texts",
    table=_compare_table,
)
