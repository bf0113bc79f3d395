"""A language model in `llmctl report`: its run's perplexities, and a compare's perplexity against size
and latency (an instruction-tuned model is reported as one too)."""

from __future__ import annotations

from typing import Any

from llmctl.reporting.panels import ComparePanels, RunPanels, number, timing_mark


def _summarize(metrics: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The val perplexity of the last eval and of the one with the lowest val loss."""
    from llmctl.reporting.runs import best_row

    last, best = (metrics.evals[-1] if metrics.evals else None), best_row(metrics.evals, "val_loss", highest=False)
    return {"final_val_ppl": last.get("val_ppl") if last else None, "best_val_ppl": best.get("val_ppl") if best else None}


def _compare_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    from llmctl.units import human_bytes

    header = ["model", "backend", "perplexity", "Δ%", "size", "forward ms", "gen tok/s"]
    body = [[r["name"], r["backend"], number(r["perplexity"], ".3f"), number(r.get("perplexity_change_pct"), "+.2f"),
             human_bytes(r["size_bytes"]), number(r["forward_ms"], ".2f") + timing_mark(r),
             number(r["generate_tokens_per_s"], ".0f") + timing_mark(r)] for r in rows]
    return header, body


RUN = RunPanels(label="lm", kind="language model", loss_unit="token", summarize=_summarize,
                facts=lambda summary: [], plots=lambda metrics, files: [])

COMPARE = ComparePanels(
    label="lm", models="models", quality=(("perplexity", "perplexity", "o"),), quality_title="perplexity",
    y_name="perplexity", y_label="perplexity (lower is better)", latency_caption=", batch 1 at full context.",
    scored=lambda report: f"{report['tokens']:,} tokens", table=_compare_table,
)
