#!/usr/bin/env python
"""What the median pruner of `llmctl tune` saves, and what it costs, on a real small search.

    .venv/bin/python benchmarks/bench_tune.py [--trials N] [--quick] [--json-out FILE]

The same study is run twice through the real CLI (`llmctl tune RECIPE tune.pruner=... --study-dir
DIR --json`, a subprocess each), once with `tune.pruner=median` and once with `tune.pruner=none`:
the same recipe, search space, sampler seed, trial count and per-trial step budget, each in a study
dir of its own, on one dataset prepared once beforehand (`llmctl prepare`).

The problem: a small GPT (2 layers, d_model 64, 2 heads, context 64, vocab 512, batch 16 x 64,
AdamW, cosine schedule, grad clip 1.0) on ~400 KB of `builtin:stdlib` (the standard library's
Python source), MAX_STEPS steps per trial, evaluated on the fixed val windows every EVAL_EVERY
steps (8 evaluations per trial). The objective is the trial's best val_loss. The space (TPE):
train.lr on a log scale from 1e-5 (far too small: barely leaves the unigram loss in the budget)
to 1.0 (AdamW diverges: the loss climbs back up) and train.warmup_steps.

How it runs: with 2 or more usable cores the two studies run at the same time, each `llmctl tune`
pinned (sched_setaffinity) to a core of its own, so each gives its worker one thread (the CLI's
usual share: usable cores / --jobs). At this model size one thread trains as fast as two (~53k
tokens/s either way on the 2-core machine), and a one-thread process is not wrecked by other
processes the way two-thread PyTorch is (shared/NOTES.md); --sequential runs the studies one after
the other with all cores instead. Both studies always get the same thread count, and the figures
compared are step counts and objective values, which do not depend on timing.

Identical seeds make TPE's start-up trials identical in both studies; after that the sampled
points differ, because pruned trials inform TPE differently from finished ones: that is part of
what is measured, not noise to remove.

Measured, per study:
- steps: the training steps the study actually ran = the sum over its trials of the last training
  step each reached, read from the trial's own STUDY_DIR/trials/trial-NNNN/metrics.jsonl (the
  largest "step" of a training row, i.e. a row with "loss"). LOG_EVERY divides EVAL_EVERY, so a
  trial pruned at an evaluation has a training row at exactly that step; a trial that failed
  between two logging rows would be counted to its last logging row (none did unless the
  table's "fail" column says so).
- trials by state (complete / pruned / fail) from STUDY_DIR/summary.json and trials.csv.
- the best objective (summary.json's best value).

Targets: pruned steps / unpruned steps <= 50 %; the pruned study's best within 2 % of the unpruned
study's best ((pruned - unpruned) / unpruned <= +2 %; lower is better, so a negative difference
means the pruned study found the better trial). For context it also prints the best the
unpruned study had reached once it had spent as many steps as the whole pruned study (its trials in
order), the comparison at equal compute.

Step counts and objective values do not depend on machine load (the runs are deterministic for a
seed); the wall times printed are context only (see shared/NOTES.md, "Timing on 2 cores").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SEED = 0
TRIALS = 20
MAX_STEPS = 400
EVAL_EVERY = 50  # 8 evaluations per trial
LOG_EVERY = 10  # divides EVAL_EVERY: a pruned trial's last training row is its pruning step
STARTUP_TRIALS = 4  # TPE's random start
PRUNER_STARTUP_TRIALS = 3  # finished trials before the median pruner prunes anything
PRUNER_WARMUP_STEPS = 0  # no pruning before this step (step-0 comparisons are already meaningful here)

QUICK = {"trials": 10, "max_steps": 240, "eval_every": 30}

SPACE = {
    "train.lr": {"type": "float", "low": 1.0e-5, "high": 1.0, "log": True},
    "train.warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 10},
}

TARGET_STEP_FRACTION = 0.50
TARGET_REL_DIFF = 0.02


def recipe_yaml(data_dir: Path, max_steps: int, eval_every: int, trials: int, warmup: int) -> str:
    recipe = {
        "run": {"name": "bench-tune", "seed": SEED},
        "data": {"sources": ["builtin:stdlib"], "max_bytes": 400_000, "vocab_size": 512, "dir": str(data_dir)},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "context_length": 64, "dropout": 0.0},
        "train": {
            "max_steps": max_steps, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1,
            "schedule": "cosine", "warmup_steps": 0, "grad_clip": 1.0,
            "eval_every": eval_every, "eval_batches": 4, "log_every": LOG_EVERY, "checkpoint_every": 100_000,
        },
        "tune": {
            "objective": "val_loss", "direction": "minimize", "trials": trials, "sampler": "tpe", "seed": SEED,
            "startup_trials": STARTUP_TRIALS, "pruner": "median", "pruner_startup_trials": PRUNER_STARTUP_TRIALS,
            "pruner_warmup_steps": warmup, "space": SPACE,
        },
    }
    return json.dumps(recipe, indent=2) + "\n"  # JSON is YAML


def llmctl_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "llmctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llmctl"]


def start_cli(args: list[str], cwd: Path, log: Path, cpus: set[int] | None) -> tuple[subprocess.Popen, Any, float]:
    """Start `llmctl ARGS`; with `cpus`, pinned to those cores (the CLI then gives its worker that many threads)."""
    err = open(log, "w", encoding="utf-8")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen([*llmctl_cmd(), *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}, preexec_fn=pin)
    return proc, err, time.perf_counter()


def finish_cli(args: list[str], started: tuple[subprocess.Popen, Any, float], log: Path) -> float:
    proc, err, t0 = started
    rc = proc.wait()
    wall = time.perf_counter() - t0
    err.close()
    if rc != 0:
        sys.exit(f"llmctl {' '.join(args)} failed with exit code {rc}; its stderr is in {log}:\n"
                 + log.read_text(encoding="utf-8")[-3000:])
    return wall


def run_cli(args: list[str], cwd: Path, log: Path, cpus: set[int] | None = None) -> float:
    return finish_cli(args, start_cli(args, cwd, log, cpus), log)


def trial_steps(run_dir: Path) -> tuple[int, int, float | None]:
    """(last training step, evaluations, best val_loss) from a trial's metrics.jsonl."""
    last, evals, best = 0, 0, None
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0, 0, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row and "step" in row:
            last = max(last, int(row["step"]))
        if "val_loss" in row:
            evals += 1
            best = row["val_loss"] if best is None else min(best, row["val_loss"])
    return last, evals, best


def collect(study_dir: Path, wall_s: float, budget: int) -> dict[str, Any]:
    summary = json.loads((study_dir / "summary.json").read_text(encoding="utf-8"))
    with open(study_dir / "trials.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    trials = []
    for r in rows:
        n = int(r["number"])
        steps, evals, best_val = trial_steps(study_dir / "trials" / f"trial-{n:04d}")
        trials.append({
            "number": n, "state": r["state"], "value": float(r["value"]) if r["value"] else None,
            "params": {k: (int if SPACE[k]["type"] == "int" else float)(float(r[k])) for k in SPACE if r.get(k)},
            "steps": steps, "evals": evals,
            "best_val_loss": best_val, "reason": r["reason"],
        })
    trials.sort(key=lambda t: t["number"])
    best = summary["best"]
    return {
        "study_dir": str(study_dir),
        "wall_s": round(wall_s, 1),
        "steps": sum(t["steps"] for t in trials),
        "step_budget": budget * len(trials),
        "trials": {s: summary["trials"].get(s, 0) for s in ("complete", "pruned", "fail")},
        "best": best["value"] if best else None,
        "best_trial": best["number"] if best else None,
        "best_params": best["params"] if best else None,
        "per_trial": trials,
    }


def best_within(study: dict[str, Any], steps: int) -> float | None:
    """The best objective the study had once its trials (in order) had used up `steps` steps."""
    best, used = None, 0
    for t in study["per_trial"]:
        if used + t["steps"] > steps:
            break
        used += t["steps"]
        if t["state"] == "complete" and t["value"] is not None:
            best = t["value"] if best is None else min(best, t["value"])
    return best


def print_trials(name: str, study: dict[str, Any]) -> None:
    print(f"\n{name}: {study['study_dir']}")
    print(f"  {'trial':>5}  {'state':<8}  {'lr':>9}  {'warmup':>6}  {'steps':>5}  {'evals':>5}  {'best val':>8}")
    for t in study["per_trial"]:
        p = t["params"]
        val = f"{t['best_val_loss']:.4f}" if t["best_val_loss"] is not None else "-"
        print(f"  {t['number']:>5}  {t['state']:<8}  {p.get('train.lr', float('nan')):>9.3g}  "
              f"{int(p.get('train.warmup_steps', 0)):>6}  {t['steps']:>5}  {t['evals']:>5}  {val:>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=None, help=f"trials per study (default {TRIALS}; --quick {QUICK['trials']})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['trials']} trials of {QUICK['max_steps']} steps (about 2 min)")
    ap.add_argument("--max-steps", type=int, default=None, help=f"steps per trial (default {MAX_STEPS})")
    ap.add_argument("--eval-every", type=int, default=None, help=f"evaluation cadence (default {EVAL_EVERY})")
    ap.add_argument("--pruner-warmup-steps", type=int, default=PRUNER_WARMUP_STEPS)
    ap.add_argument("--sequential", action="store_true", help="run the two studies one after the other, each with all cores")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the studies here (default: a temp dir, removed)")
    args = ap.parse_args()

    trials = args.trials or (QUICK["trials"] if args.quick else TRIALS)
    max_steps = args.max_steps or (QUICK["max_steps"] if args.quick else MAX_STEPS)
    eval_every = args.eval_every or (QUICK["eval_every"] if args.quick else EVAL_EVERY)
    if eval_every % LOG_EVERY:
        ap.error(f"--eval-every must be a multiple of {LOG_EVERY} (LOG_EVERY) so pruned trials' steps are exact")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tune-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        recipe = work / "tune.yaml"
        recipe.write_text(recipe_yaml(work / "data", max_steps, eval_every, trials, args.pruner_warmup_steps), encoding="utf-8")
        print(f"bench_tune: {trials} trials per study, {max_steps} steps per trial, eval every {eval_every} "
              f"({max_steps // eval_every} evaluations), TPE seed {SEED} ({STARTUP_TRIALS} start-up trials), median "
              f"pruner after {PRUNER_STARTUP_TRIALS} trials, warmup {args.pruner_warmup_steps} steps; work dir {work}",
              flush=True)
        prep_s = run_cli(["prepare", str(recipe)], work, work / "prepare.log")
        print(f"prepared the dataset in {prep_s:.1f} s", flush=True)

        # Both studies at once, each pinned to a core of its own (1 thread each: at this model size one
        # thread is as fast as two, and two-thread PyTorch collapses when anything else runs), or one
        # after the other with all cores (--sequential, or fewer than 2 usable cores).
        cores = sorted(os.sched_getaffinity(0))
        parallel = not args.sequential and len(cores) >= 2
        pins = {"median": {cores[0]}, "none": {cores[1]}} if parallel else {"median": None, "none": None}
        cmds, logs, started = {}, {}, {}
        for pruner in ("median", "none"):
            sdir = work / f"study-{pruner}"
            if sdir.exists():
                shutil.rmtree(sdir)
            cmds[pruner] = ["tune", str(recipe), f"tune.pruner={pruner}", "--study-dir", str(sdir), "--json"]
            logs[pruner] = work / f"tune-{pruner}.log"
            where = f" (pinned to core {cores[0] if pruner == 'median' else cores[1]})" if parallel else ""
            print(f"running: llmctl {' '.join(cmds[pruner])}{where}", flush=True)
            if parallel:
                started[pruner] = start_cli(cmds[pruner], work, logs[pruner], pins[pruner])
            else:
                started[pruner] = (None, run_cli(cmds[pruner], work, logs[pruner]))
        studies: dict[str, dict[str, Any]] = {}
        for pruner in ("median", "none"):
            wall = finish_cli(cmds[pruner], started[pruner], logs[pruner]) if parallel else started[pruner][1]
            studies[pruner] = collect(work / f"study-{pruner}", wall, max_steps)
            print_trials(f"pruner={pruner}", studies[pruner])

        pr, un = studies["median"], studies["none"]
        step_fraction = pr["steps"] / un["steps"]
        rel_diff = (pr["best"] - un["best"]) / un["best"] if pr["best"] is not None and un["best"] else None
        equal_compute = best_within(un, pr["steps"])
        steps_ok = step_fraction <= TARGET_STEP_FRACTION
        best_ok = rel_diff is not None and rel_diff <= TARGET_REL_DIFF
        total_s = time.perf_counter() - t_all

        def states(s: dict[str, Any]) -> str:
            return " / ".join(str(s["trials"][k]) for k in ("complete", "pruned", "fail"))

        mode = "both at once, one core each" if parallel else "one after the other"
        print(f"\nResults ({trials} trials x {max_steps} steps per study, seed {SEED}, {mode}; total {total_s:.0f} s)")
        rows = [
            ("", "pruner=median", "pruner=none"),
            ("training steps run", f"{pr['steps']:,}", f"{un['steps']:,}"),
            ("step budget (trials x max_steps)", f"{pr['step_budget']:,}", f"{un['step_budget']:,}"),
            ("trials complete / pruned / fail", states(pr), states(un)),
            ("best val_loss (trial)", f"{pr['best']:.4f} (#{pr['best_trial']})", f"{un['best']:.4f} (#{un['best_trial']})"),
            ("best lr / warmup", f"{pr['best_params']['train.lr']:.3g} / {pr['best_params'].get('train.warmup_steps')}",
             f"{un['best_params']['train.lr']:.3g} / {un['best_params'].get('train.warmup_steps')}"),
            ("wall time (context only)", f"{pr['wall_s']:.0f} s", f"{un['wall_s']:.0f} s"),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        for r in rows:
            print(f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>18}")
        print(f"  steps pruned / unpruned: {step_fraction:.1%}   (target <= {TARGET_STEP_FRACTION:.0%}: "
              f"{'met' if steps_ok else 'NOT met'})")
        print(f"  best, pruned vs unpruned: {rel_diff:+.2%}   (target <= +{TARGET_REL_DIFF:.0%}: "
              f"{'met' if best_ok else 'NOT met'})")
        if equal_compute is not None:
            print(f"  unpruned best within the pruned study's {pr['steps']:,} steps: {equal_compute:.4f} "
                  f"(pruned {pr['best']:.4f}, {(pr['best'] - equal_compute) / equal_compute:+.2%})")

        result = {
            "config": {"trials": trials, "max_steps": max_steps, "eval_every": eval_every, "log_every": LOG_EVERY,
                       "seed": SEED, "startup_trials": STARTUP_TRIALS, "pruner_startup_trials": PRUNER_STARTUP_TRIALS,
                       "pruner_warmup_steps": args.pruner_warmup_steps, "space": SPACE, "quick": args.quick,
                       "parallel_pinned": parallel, "recipe": json.loads(recipe.read_text(encoding="utf-8"))},
            "step_count": "sum over trials of the largest 'step' of a training row ('loss') in the trial's metrics.jsonl",
            "median": pr, "none": un,
            "step_fraction": step_fraction, "best_rel_diff": rel_diff, "unpruned_best_at_equal_steps": equal_compute,
            "targets": {"step_fraction_max": TARGET_STEP_FRACTION, "best_rel_diff_max": TARGET_REL_DIFF,
                        "step_fraction_met": steps_ok, "best_met": best_ok},
            "total_s": round(total_s, 1),
        }
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            print(f"  JSON: {args.json_out}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
