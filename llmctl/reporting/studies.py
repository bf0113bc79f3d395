"""The report of one study dir: its Optuna storage read back and drawn (history, importances, parallel coordinates)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.artifacts import StudyDir
from llmctl.errors import LlmctlError
from llmctl.reporting.html import Page, Plot, Table, write_page
from llmctl.reporting.layout import ReportFiles
from llmctl.reporting.runs import format_seconds

STATES = ("complete", "pruned", "fail", "running", "waiting")


def is_study_dir(path: Path) -> bool:
    sd = StudyDir(Path(path))
    return any(p.is_file() for p in (sd.storage_file, sd.summary, sd.spec))


def _recorded(sd: StudyDir) -> tuple[dict[str, Any], dict[str, Any]]:
    """summary.json and spec.json as `tune` wrote them ({} where missing or unreadable)."""
    found = []
    for path in (sd.summary, sd.spec):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            obj = {}
        found.append(obj if isinstance(obj, dict) else {})
    return found[0], found[1]


def storage_of(study_dir: Path) -> str:
    """The study's storage URL: the SQLite file in the dir, else the URL `tune` recorded in spec.json."""
    sd = StudyDir(Path(study_dir))
    if sd.storage_file.is_file():
        return f"sqlite:///{sd.storage_file.resolve()}"
    url = _recorded(sd)[1].get("storage")
    if not isinstance(url, str) or not url:
        raise LlmctlError(f"{sd.path}: no study.db and no storage recorded in spec.json; is this a study dir of `llmctl tune`?")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        # Opening a missing SQLite file would create an empty one and report an empty study.
        raise LlmctlError(f"{sd.path}: its storage {url} is missing (moved or deleted).")
    return url


def load_study_dir(study_dir: Path) -> Any:
    """The Optuna study of a study dir, read from its storage (refused with the reason if it cannot be)."""
    import optuna

    from llmctl.tuning.study import quiet_optuna

    quiet_optuna()
    sd = StudyDir(Path(study_dir))
    url = storage_of(sd.path)
    name = _recorded(sd)[0].get("study")
    try:
        if not name:
            names = optuna.get_all_study_names(storage=url)
            if len(names) != 1:
                raise LlmctlError(f"{url}: holds {len(names)} studies ({', '.join(names) or 'none'}); expected the one `tune` made.")
            name = names[0]
        return optuna.load_study(study_name=name, storage=url)
    except LlmctlError:
        raise
    except Exception as e:  # sqlalchemy and optuna raise many kinds; the storage is what is wrong
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlmctlError(f"{sd.path}: cannot read the study from {url} ({first[:300]}).") from None


def summarize_study(study: Any, study_dir: Path) -> dict[str, Any]:
    """Trial counts by state and the best trial (number, objective value, parameters, run dir)."""
    from llmctl.tuning.study import trial_rows

    rows = trial_rows(study)
    recorded = _recorded(StudyDir(Path(study_dir)))[0]
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = None
    if complete:
        trial = study.best_trial
        best = {"number": trial.number, "value": trial.value, "params": dict(trial.params), "run_dir": trial.user_attrs.get("run_dir")}
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "objective": recorded.get("objective") or "objective",
        "trials": {s: sum(1 for r in rows if r["state"] == s) for s in STATES},
        "best": best,
        "_rows": rows,
    }


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary as (label, text) lines, for the HTML page and the terminal alike."""
    counts = ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n) or "none"
    facts = [("study", summary["study"]), ("objective", f"{summary['direction']} {summary['objective']}"), ("trials", counts)]
    best = summary["best"]
    if best:
        facts.append(("best trial", f"{best['number']}: {summary['objective']} {_fmt(best['value'])}"))
        facts.extend((f"  {k}", _fmt(v)) for k, v in best["params"].items())
    else:
        facts.append(("best trial", "none completed yet"))
    return facts


def plot_study(study: Any, files: ReportFiles, objective: str) -> tuple[list[Plot], list[str]]:
    """Optimisation history, parameter importances, parallel coordinates and the trials' learning curves
    (Optuna's matplotlib plots); returns the plots and a note for each one that could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    from llmctl.reporting.plots import save_png

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return [], ["No trial has completed yet, so there is nothing to plot."]
    has_params = bool(study.best_trial.params)
    steps = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
    wanted = [
        ("history", "Optimisation history", f"{objective} of each completed trial and the best so far.",
         lambda: ovm.plot_optimization_history(study, target_name=objective), None),
        ("importances", "Parameter importances", "How much of the objective's spread each parameter explains (PED-ANOVA).",
         lambda: ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target_name=objective),
         None if has_params and len(complete) >= 2 else "needs two completed trials with searched parameters"),
        ("parallel", "Parallel coordinates", f"Each completed trial's parameters, coloured by {objective}; the best in red.",
         lambda: parallel_coordinates(study, objective), None if has_params else "no searched parameters"),
        ("curves", "Learning curves", "The value each trial reported at each evaluation step, pruned trials included.",
         lambda: ovm.plot_intermediate_values(study), None if steps else "no trial reported intermediate values"),
    ]
    plots, notes = [], []
    for name, title, caption, draw, why_not in wanted:
        if why_not:
            notes.append(f"{title}: not drawn ({why_not}).")
            continue
        # Optuna's plots set the ggplot style globally; keep it inside this block.
        with matplotlib.rc_context():
            try:
                ax = draw()
            except (ValueError, RuntimeError) as e:  # e.g. too few distinct trials to rank parameters
                notes.append(f"{title}: not drawn ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}).")
                continue
            fig = ax.figure
            if name == "curves" and ax.get_legend() is not None and len(ax.get_lines()) > 20:
                ax.get_legend().remove()  # one entry per trial: past a screenful it hides the curves
            try:
                plots.append(Plot(title, save_png(fig, files.plot(name)), caption))
            finally:
                plt.close(fig)
    return plots, notes


def _axis(values: list[Any], distribution: Any) -> tuple[list[float], list[tuple[float, str]]]:
    """Values placed on [0, 1] (log-spaced for a log distribution, in order of choices for a categorical one)
    and the (position, label) ticks that name them."""
    import math

    choices = getattr(distribution, "choices", None)
    if choices is not None:
        index = {c: i for i, c in enumerate(choices)}
        span = max(len(choices) - 1, 1)
        return [index[v] / span if len(choices) > 1 else 0.5 for v in values], [
            (i / span if len(choices) > 1 else 0.5, str(c)) for i, c in enumerate(choices)]
    log = bool(getattr(distribution, "log", False)) and all(v > 0 for v in values)
    scaled = [math.log10(v) if log else float(v) for v in values]
    lo, hi = min(scaled), max(scaled)
    if hi == lo:
        return [0.5] * len(values), [(0.5, _fmt(values[0]))]
    ticks = []
    for t in (0.0, 0.5, 1.0):
        raw = lo + t * (hi - lo)
        ticks.append((t, _fmt(10**raw if log else raw)))
    return [(v - lo) / (hi - lo) for v in scaled], ticks


def parallel_coordinates(study: Any, objective: str) -> Any:
    """One vertical axis for the objective and one per parameter, a line per completed trial coloured by
    its objective value and the best trial in red; returns the axes (its figure is what gets saved)."""
    from matplotlib import cm, colors
    from optuna.trial import TrialState

    from llmctl.reporting.plots import VAL, new_figure

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    params = sorted({p for t in trials for p in t.params})
    trials = [t for t in trials if all(p in t.params for p in params)]  # a conditional space leaves some out
    values = [t.value for t in trials]
    columns = [_axis(values, None)]
    for p in params:
        columns.append(_axis([t.params[p] for t in trials], trials[0].distributions[p]))
    fig, (ax,) = new_figure(width=max(6.4, 2.2 * len(columns)), height=4.5)
    ax.grid(False)
    norm = colors.Normalize(min(values), max(values))
    cmap = cm.viridis_r if study.direction.name == "MINIMIZE" else cm.viridis
    best = study.best_trial.number
    xs = list(range(len(columns)))
    for i, t in enumerate(trials):
        ys = [col[0][i] for col in columns]
        if t.number == best:
            continue
        ax.plot(xs, ys, color=cmap(norm(t.value)), lw=1.5, alpha=0.8)
    for i, t in enumerate(trials):
        if t.number == best:
            ax.plot(xs, [col[0][i] for col in columns], color=VAL, lw=3, label=f"best: trial {best}", zorder=4)
    for x, (_, ticks) in zip(xs, columns):
        ax.axvline(x, color="black", lw=1)
        for y, text in ticks:
            ax.annotate(text, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=8, va="center",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=5)
    ax.set_xticks(xs, [objective, *params], rotation=15)
    ax.set_yticks([])
    ax.set_xlim(-0.1, len(columns) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=objective, pad=0.02)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False)
    ax.set_title("parallel coordinates")
    return ax


def _trials_table(rows: list[dict[str, Any]]) -> Table:
    params = sorted({k for r in rows for k in r["params"]})
    body = []
    for r in rows:
        duration = format_seconds(r["duration_s"]) if r["duration_s"] is not None else ""
        body.append([str(r["number"]), r["state"], "" if r["value"] is None else _fmt(r["value"]),
                     *[_fmt(r["params"][p]) if p in r["params"] else "" for p in params],
                     "" if r["last_reported_step"] is None else str(r["last_reported_step"]), duration, r["reason"]])
    header = ["trial", "state", "objective", *params, "last step", "duration", "reason"]
    numeric = {0, 2, *range(3, 3 + len(params) + 2)}
    return Table("Trials", header, body, numeric)


def report_study(study_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Write report.html and the PNG plots of a study dir (into the study dir unless `out_dir`); return the summary."""
    study_dir = Path(study_dir)
    study = load_study_dir(study_dir)
    summary = summarize_study(study, study_dir)
    rows = summary.pop("_rows")
    files = ReportFiles(Path(out_dir) if out_dir is not None else study_dir)
    files.prepare()
    plots, notes = plot_study(study, files, summary["objective"])
    best_recipe = StudyDir(study_dir).best_recipe
    page = Page(
        title=f"Study {summary['study']}",
        subtitle=f"{study_dir}: {len(rows)} trials read from its Optuna storage",
        facts=study_facts(summary),
        plots=plots,
        notes=notes,
        tables=[_trials_table(rows)] if rows else [],
        texts=[("best.yaml", best_recipe.read_text(encoding="utf-8"))] if best_recipe.is_file() else [],
    )
    write_page(files.html, page)
    return {
        "kind": "study",
        "study_dir": str(study_dir),
        **summary,
        "files": files.listing(plots),
    }
