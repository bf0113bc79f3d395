#!/usr/bin/env python
"""Training throughput of llmctl against a plain hand-written PyTorch loop, in the same run.

    .venv/bin/python benchmarks/bench_train.py [--steps N] [--rounds R] [--quick] [--json-out FILE]

What it compares (each measurement in a FRESH subprocess: this script re-invoked with
`--worker SPEC --json`; the measurements of a round run one after another, each pair's order is
reversed every other round, A B / B A, so slow drift cancels; the llmctl / plain pair runs
A B B A / B A A B, two processes each per round, since fresh processes of the same job differ by a
few percent and that ratio is the one that needs the precision):

1. fp32, the tiny GPT (4 layers, d_model 128, 4 heads, context 128, vocab 4096, batch 16 x 128,
   AdamW, grad clip 1.0): `llmctl.training.trainer.train` (the real engine, Accelerate and all)
   against a plain loop of the same model (`build_model`, same config and seed), the same AdamW
   groups / lr / betas / eps / weight decay, and the same random windows of the same train.bin
   (numpy memmap). Target: llmctl / plain >= 0.97.
2. The machine's peak: a 2048 x 2048 @ 2048 x 2048 matmul (fp32 and bf16, best of a few reps, same
   thread count), and the share of that peak each side reaches, with
   FLOPs/token = 6 N + 6 n_layer ctx d_model (N = unique parameters; the causal attention score
   and value matmuls are the second term).
3. bf16 against fp32, both through llmctl's train (train.precision), at d_model 512 (4 layers,
   8 heads, context 128, batch 8 x 128) and, for contrast, at d_model 128 (the model of 1.).

Timing: only steady-state steps. Each worker runs `warmup + steps` optimizer steps and times the
last `steps` of them by the wall clock between step ends: for llmctl between the calls of
`TrainCallbacks.on_step` (which train() makes after each optimizer + scheduler step, and after
writing the metrics row of a logging step), for the plain loop after each `zero_grad`. As a
cross-check the llmctl worker also reads `tokens_per_s` of its metrics.jsonl rows, skipping the
first window (log_every = warmup, so that window is exactly the warm-up). Evaluation and
checkpoints happen only after the last timed step (eval_every = checkpoint_every = max_steps).

The result is a set of ratios; absolute tokens/s are context only (another busy process on a
2-core machine slows PyTorch many times over, see shared/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED = 0
VOCAB = 4096
DATA_MAX_BYTES = 3_000_000
# The shared optimizer settings (tiny-gpt.yaml's, with a constant lr so the plain loop needs no schedule).
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
FLOPS_FORMULA = "FLOPs/token = 6*N + 6*n_layer*ctx*d_model  (N = unique parameters, tied embedding once)"

TINY = {"n_layer": 4, "n_head": 4, "d_model": 128, "context_length": 128}
WIDE = {"n_layer": 4, "n_head": 8, "d_model": 512, "context_length": 128}


# --------------------------------------------------------------------------- workers (fresh processes)


def _model_section(model: dict) -> dict:
    return {"family": "gpt", "dropout": 0.0, "vocab_size": None, **model}


def _flops_per_token(n_params: int, model: dict) -> int:
    return 6 * n_params + 6 * model["n_layer"] * model["context_length"] * model["d_model"]


def _threads(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))


def worker_llmctl(spec: dict) -> dict:
    """Train through llmctl.training.trainer.train and time the steady-state steps."""
    import torch

    from llmctl.config.schema import Recipe
    from llmctl.training.trainer import TrainCallbacks, train

    _threads(spec)
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    recipe = Recipe.model_validate(
        {
            "run": {"name": "bench", "seed": SEED},
            "data": {"dir": spec["dataset"]},
            "model": _model_section(spec["model"]),
            "train": {
                "max_steps": total,
                "batch_size": spec["batch"],
                "optimizer": "adamw",
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
                "schedule": "constant",
                "warmup_steps": 0,
                "grad_clip": GRAD_CLIP,
                "precision": spec["precision"],
                "log_every": warmup,
                "eval_every": total,
                "eval_batches": 1,
                "checkpoint_every": total,
                "keep_checkpoints": 1,
                "keep_best": False,
            },
        }
    )

    class Clock(TrainCallbacks):
        def __init__(self) -> None:
            self.ends: dict[int, float] = {}
            self.info: dict[str, Any] = {}
            self.threads = 0

        def on_start(self, info: dict[str, Any]) -> None:
            self.info = info
            self.threads = torch.get_num_threads()

        def on_step(self, step: int, row: dict[str, Any] | None) -> None:
            self.ends[step] = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="bench-train-run-") as tmp:
        run_dir = Path(tmp) / "run"
        if spec.get("profile"):
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            train(recipe, run_dir, callbacks=clock)
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(35)
        else:
            train(recipe, run_dir, callbacks=clock)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens_per_step = spec["batch"] * spec["model"]["context_length"]
    elapsed = clock.ends[total] - clock.ends[warmup]
    # Cross-check: the metrics.jsonl windows after the first (warm-up) one.
    windows = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup]
    prev = warmup
    win_tokens = win_time = 0.0
    for r in windows:
        n = (r["step"] - prev) * tokens_per_step
        win_tokens += n
        win_time += n / r["tokens_per_s"]
        prev = r["step"]
    train_rows = [r for r in rows if "loss" in r]
    n_params = int(clock.info["parameters"])
    step_times = [clock.ends[i] - clock.ends[i - 1] for i in range(warmup + 1, total + 1)]
    return {
        "tokens_per_s": steps * tokens_per_step / elapsed,
        "median_step_tokens_per_s": tokens_per_step / statistics.median(step_times),
        "metrics_tokens_per_s": win_tokens / win_time if win_time else None,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "parameters": n_params,
        "flops_per_token": _flops_per_token(n_params, spec["model"]),
        "threads": clock.threads,
    }


def worker_plain(spec: dict) -> dict:
    """The same training written by hand: no llmctl training code, no Accelerate."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F

    from llmctl.config.schema import ModelConfig
    from llmctl.models import build_model

    _threads(spec)
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    B, T = spec["batch"], spec["model"]["context_length"]
    ds = Path(spec["dataset"])
    meta = json.loads((ds / "meta.json").read_text())
    tokens = np.memmap(ds / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["splits"]["train"]["tokens"],))
    max_start = len(tokens) - T - 1

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    config = ModelConfig(**_model_section(spec["model"])).model_dump()
    config["vocab_size"] = int(meta["vocab_size"])
    model = build_model(config)
    params = list(model.parameters())  # unique tensors: the tied embedding appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    autocast = spec["precision"] == "bf16"
    model.train()
    losses = []
    ends = []
    for step in range(total):
        starts = np.random.default_rng([SEED, step]).integers(0, max_start + 1, size=B)
        block = torch.from_numpy(np.stack([np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in starts]))
        x, y = block[:, :-1], block[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        ends.append(time.perf_counter())
    n_params = sum(p.numel() for p in params)
    step_times = [ends[i] - ends[i - 1] for i in range(warmup, total)]
    return {
        "tokens_per_s": steps * B * T / (ends[total - 1] - ends[warmup - 1]),
        "median_step_tokens_per_s": B * T / statistics.median(step_times),
        # the mean over the last logging window, as llmctl's last metrics row has it
        "last_loss": round(float(torch.stack(losses[-(((total - 1) % warmup) + 1) :]).mean()), 6),
        "parameters": n_params,
        "flops_per_token": _flops_per_token(n_params, spec["model"]),
        "threads": torch.get_num_threads(),
    }


def worker_peak(spec: dict) -> dict:
    """Best-of-reps GFLOP/s of an n x n @ n x n matmul, fp32 and bf16."""
    import torch

    _threads(spec)
    n, reps = spec["n"], spec["reps"]
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        c = torch.mm(a, b)  # warm-up: allocation, kernel selection
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2 * n**3 / best / 1e9
    return out


WORKERS = {"llmctl": worker_llmctl, "plain": worker_plain, "peak": worker_peak}


# --------------------------------------------------------------------------- driver


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--json"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench_train: worker {spec['kind']} failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def prepare(out_dir: Path) -> dict:
    from llmctl.config.schema import DataConfig
    from llmctl.data.prepare import prepare_dataset

    data = DataConfig(sources=["builtin:stdlib"], vocab_size=VOCAB, max_bytes=DATA_MAX_BYTES, encoding_errors="replace")
    return prepare_dataset(data, out_dir, seed=SEED).meta


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps of the d128 runs (default 40, quick 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps of the d128 runs (default 10, quick 5)")
    ap.add_argument("--wide-steps", type=int, default=None, help="timed steps of the d512 runs (default 16, quick 6)")
    ap.add_argument("--wide-warmup", type=int, default=None, help="warm-up steps of the d512 runs (default 4, quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (~1.5 minutes)")
    ap.add_argument("--no-wide", action="store_true", help="skip the bf16 comparison at d_model 512")
    ap.add_argument("--profile", action="store_true",
                    help="run one llmctl fp32 d128 worker under cProfile (stats on stderr) and exit")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        result = WORKERS[spec["kind"]](spec)
        print(json.dumps(result))
        return

    q = args.quick
    steps = args.steps or (20 if q else 40)
    warmup = args.warmup or (5 if q else 10)
    wide_steps = args.wide_steps or (6 if q else 16)
    wide_warmup = args.wide_warmup or (2 if q else 4)
    rounds = args.rounds or (2 if q else 3)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-train-data-") as tmp:
        dataset = Path(tmp) / "data"
        meta = prepare(dataset)
        base = {"dataset": str(dataset), "threads": args.threads}
        tiny = {**base, "model": TINY, "batch": 16, "warmup": warmup, "steps": steps}
        wide = {**base, "model": WIDE, "batch": 8, "warmup": wide_warmup, "steps": wide_steps}
        specs = {
            "llmctl_fp32_d128": {**tiny, "kind": "llmctl", "precision": "fp32"},
            "plain_fp32_d128": {**tiny, "kind": "plain", "precision": "fp32"},
            "llmctl_bf16_d128": {**tiny, "kind": "llmctl", "precision": "bf16"},
            "llmctl_bf16_d512": {**wide, "kind": "llmctl", "precision": "bf16"},
            "llmctl_fp32_d512": {**wide, "kind": "llmctl", "precision": "fp32"},
            "peak": {**base, "kind": "peak", "n": 2048, "reps": 4},
        }
        if args.profile:
            spec = {**specs["llmctl_fp32_d128"], "profile": True}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--json"]
            subprocess.run(cmd, check=True, cwd=str(ROOT))
            return
        # (A, B, twice): pairs run back to back, A B in even rounds and B A in odd ones; a pair
        # measured twice runs A B B A (B A A B), because fresh processes of the same job differ by a
        # few percent and the llmctl / plain ratio is the one that needs the precision.
        blocks = [("llmctl_fp32_d128", "plain_fp32_d128", True), ("llmctl_bf16_d128", "peak", False)]
        if not args.no_wide:
            blocks.append(("llmctl_bf16_d512", "llmctl_fp32_d512", False))
        results: dict[str, list[dict]] = {name: [] for a, b, _ in blocks for name in (a, b)}
        for r in range(rounds):
            for a, b, twice in blocks:
                first, second = (a, b) if r % 2 == 0 else (b, a)
                for name in (first, second, second, first) if twice else (first, second):
                    out = run_worker(specs[name])
                    out["round"] = r
                    results[name].append(out)
                    print(f"  round {r + 1}/{rounds} {name:18s} done ({time.perf_counter() - t_start:5.0f} s)",
                          file=sys.stderr, flush=True)

    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    report = summarize(results, specs, meta, rounds, load_before, load_after, elapsed)
    print_table(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


def summarize(results, specs, meta, rounds, load_before, load_after, elapsed) -> dict:
    def tps(name: str, r: int | None = None) -> list[float]:
        return [x["tokens_per_s"] for x in results.get(name, []) if r is None or x["round"] == r]

    def comparison(a: str, b: str, label: str) -> dict | None:
        if not results.get(a) or not results.get(b):
            return None
        per_round = [statistics.mean(tps(a, r)) / statistics.mean(tps(b, r)) for r in range(rounds)]
        return {
            "label": label,
            "a": a,
            "b": b,
            "a_median_tokens_per_s": median(tps(a)),
            "b_median_tokens_per_s": median(tps(b)),
            "ratio": median(tps(a)) / median(tps(b)),
            "round_ratios": per_round,
            "median_round_ratio": median(per_round),
        }

    peak = results["peak"]
    peak32 = median([p["fp32_gflops"] for p in peak])
    peak16 = median([p["bf16_gflops"] for p in peak])
    comps = [
        comparison("llmctl_fp32_d128", "plain_fp32_d128", "fp32 d128: llmctl / plain loop"),
        comparison("llmctl_bf16_d512", "llmctl_fp32_d512", "d512: llmctl bf16 / llmctl fp32"),
        comparison("llmctl_bf16_d128", "llmctl_fp32_d128", "d128: llmctl bf16 / llmctl fp32"),
    ]
    runs = {}
    for name, rs in results.items():
        if name == "peak" or not rs:
            continue
        spec = specs[name]
        med = median(tps(name))
        fpt = rs[0]["flops_per_token"]
        peak_ref = peak16 if spec["precision"] == "bf16" else peak32
        runs[name] = {
            "kind": spec["kind"],
            "precision": spec["precision"],
            "model": spec["model"],
            "batch": spec["batch"],
            "warmup_steps": spec["warmup"],
            "timed_steps": spec["steps"],
            "parameters": rs[0]["parameters"],
            "flops_per_token": fpt,
            "tokens_per_s": tps(name),
            "median_tokens_per_s": med,
            "median_step_tokens_per_s": [x["median_step_tokens_per_s"] for x in rs],
            "metrics_tokens_per_s": [x.get("metrics_tokens_per_s") for x in rs] if spec["kind"] == "llmctl" else None,
            "achieved_gflops": med * fpt / 1e9,
            "share_of_fp32_peak": med * fpt / 1e9 / peak32,
            "share_of_own_precision_peak": med * fpt / 1e9 / peak_ref,
            "last_loss": sorted({x.get("last_loss") for x in rs}, key=lambda v: (v is None, v)),
            "threads": sorted({x["threads"] for x in rs}),
        }
    return {
        "rounds": rounds,
        "order": "one fresh process per measurement; per round: llmctl/plain fp32 d128 as A B B A (B A A B in odd "
        "rounds), then bf16 d128 and the peak matmul, then bf16/fp32 d512, each pair's order flipped every other round",
        "timing": "llmctl: wall time between TrainCallbacks.on_step calls after the warm-up steps (cross-check: "
        "metrics.jsonl tokens_per_s without its first, warm-up, window); plain: wall time between step ends after "
        "the same warm-up",
        "flops_formula": FLOPS_FORMULA,
        "dataset": {"source": "builtin:stdlib", "max_bytes": DATA_MAX_BYTES, "vocab_size": meta["vocab_size"],
                    "train_tokens": meta["splits"]["train"]["tokens"]},
        "peak": {"matmul": "2048x2048 @ 2048x2048, best of 4 reps, median over rounds",
                 "fp32_gflops": peak32, "bf16_gflops": peak16, "threads": sorted({p["threads"] for p in peak})},
        "comparisons": [c for c in comps if c],
        "runs": runs,
        "target_llmctl_over_plain": 0.97,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "elapsed_s": elapsed,
    }


def print_table(rep: dict) -> None:
    runs = rep["runs"]
    tiny = runs["llmctl_fp32_d128"]
    m = tiny["model"]
    print()
    print(f"llmctl training throughput vs a plain PyTorch loop ({rep['rounds']} rounds, fresh process per measurement)")
    print(f"  data: builtin:stdlib {rep['dataset']['max_bytes'] / 1e6:.0f} MB, vocab {rep['dataset']['vocab_size']}, "
          f"{rep['dataset']['train_tokens']:,} train tokens; AdamW lr {LR} betas {BETAS} wd {WEIGHT_DECAY}, "
          f"clip {GRAD_CLIP}, constant lr")
    print(f"  d128: gpt {m['n_layer']}L d{m['d_model']} h{m['n_head']} ctx{m['context_length']}, "
          f"{tiny['parameters'] / 1e6:.2f}M params, batch {tiny['batch']}x{m['context_length']}, "
          f"{tiny['timed_steps']} timed steps after {tiny['warmup_steps']} warm-up")
    if "llmctl_fp32_d512" in runs:
        w = runs["llmctl_fp32_d512"]
        wm = w["model"]
        print(f"  d512: gpt {wm['n_layer']}L d{wm['d_model']} h{wm['n_head']} ctx{wm['context_length']}, "
              f"{w['parameters'] / 1e6:.2f}M params, batch {w['batch']}x{wm['context_length']}, "
              f"{w['timed_steps']} timed steps after {w['warmup_steps']} warm-up")
    print(f"  order: {rep['order']}")
    print(f"  timing: {rep['timing']}")
    threads = sorted({t for r in runs.values() for t in r["threads"]} | set(rep["peak"]["threads"]))
    print(f"  torch threads in every worker: {threads}; load average (1 min) before {rep['load_average_before'][0]:.2f}, "
          f"after {rep['load_average_after'][0]:.2f}; total {rep['elapsed_s']:.0f} s")
    print()
    head = (f"{'comparison (A / B)':32s} {'A tok/s':>8s} {'B tok/s':>8s} {'ratio of medians':>16s} "
            f"{'median of rounds':>16s}   per-round A/B")
    print(head)
    print("-" * len(head))
    for c in rep["comparisons"]:
        rr = " ".join(f"{x:.3f}" for x in c["round_ratios"])
        print(f"{c['label']:32s} {c['a_median_tokens_per_s']:8.0f} {c['b_median_tokens_per_s']:8.0f} "
              f"{c['ratio']:16.3f} {c['median_round_ratio']:16.3f}   {rr}")
    print()
    p = rep["peak"]
    print(f"peak: {p['matmul']}: fp32 {p['fp32_gflops']:.0f} GFLOP/s, bf16 {p['bf16_gflops']:.0f} GFLOP/s "
          f"(bf16/fp32 {p['bf16_gflops'] / p['fp32_gflops']:.2f})")
    print(rep["flops_formula"])
    head = (f"{'run':18s} {'n':>2s} {'MFLOP/tok':>9s} {'tok/s':>7s} {'min..max tok/s':>15s} {'GFLOP/s':>7s} "
            f"{'%fp32 peak':>10s} {'%own peak':>9s}  last loss")
    print(head)
    print("-" * len(head))
    for name, r in runs.items():
        losses = " ".join("-" if x is None else f"{x:.4f}" for x in r["last_loss"])
        spread = f"{min(r['tokens_per_s']):.0f}..{max(r['tokens_per_s']):.0f}"
        print(f"{name:18s} {len(r['tokens_per_s']):2d} {r['flops_per_token'] / 1e6:9.2f} {r['median_tokens_per_s']:7.0f} "
              f"{spread:>15s} {r['achieved_gflops']:7.1f} {100 * r['share_of_fp32_peak']:9.1f}% "
              f"{100 * r['share_of_own_precision_peak']:8.1f}%  {losses}")
    print("(%own peak: against the matmul peak of the run's own precision. A single last loss (mean of the last "
          "logged window, 6 decimals) shared by llmctl and plain at fp32 d128: same model, batches and updates.)")
    cross = runs["llmctl_fp32_d128"]["metrics_tokens_per_s"]
    plain = runs["plain_fp32_d128"]
    if cross and all(cross):
        print(f"cross-check from metrics.jsonl tokens_per_s: llmctl fp32 d128 median {median(cross):.0f} tok/s, "
              f"llmctl/plain {median(cross) / plain['median_tokens_per_s']:.3f}")
    med_step = median(runs["llmctl_fp32_d128"]["median_step_tokens_per_s"]) / median(plain["median_step_tokens_per_s"])
    print(f"cross-check from the median step time of each worker: llmctl/plain {med_step:.3f}")
    c0 = rep["comparisons"][0]
    verdict = "meets" if c0["ratio"] >= rep["target_llmctl_over_plain"] else "is BELOW"
    print(f"RESULT: llmctl / plain loop at fp32 = {c0['ratio']:.3f} (ratio of medians): {verdict} the target "
          f"{rep['target_llmctl_over_plain']}")


if __name__ == "__main__":
    main()
