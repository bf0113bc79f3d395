#!/usr/bin/env python
"""Where a training step's CPU time goes: llmctl's train against the textbook reference, torch profiler.

    .venv/bin/python benchmarks/profile_train.py [--shapes tiny,d512] [--sides llmctl,ref]
        [--warmup N] [--timed N] [--profiled N] [--rows N] [--dataset DIR] [--json-out FILE]

What it measures. For each shape (tiny: 4 layers, d_model 128, 4 heads, context 128, batch 16 x 128;
d512: 4 layers, d_model 512, 8 heads, context 128, batch 8 x 128; vocab 4096 of `builtin:stdlib`,
AdamW, grad clip 1.0, fp32) and each side, one fresh process (this script with `--worker SPEC`):

- `llmctl`: the real `llmctl.training.trainer.train` (Accelerate and all), the recipe of
  benchmarks/bench_train.py with tiny-gpt.yaml's log_every 10; the profiler is driven from a
  `TrainCallbacks.on_step` hook.
- `ref`: bench_train.py's `RefGPT` (nanoGPT's GPT-2 shape) trained by its `plain_loop`.

Each worker runs `warmup` steps, then `timed` steps with the labels below but no profiler (their
median step time is the unprofiled figure), then `profiled` steps under
`torch.profiler.profile(schedule=...)` (CPU activity, no shapes or stacks). Nothing under llmctl/ is
edited: the phases are `record_function` labels added from outside, by wrapping functions and
methods before training starts (module forward hooks for the model's parts;
`Accelerator.accumulate` / `backward` / `clip_grad_norm_` / `reduce`, `AcceleratedOptimizer.step` /
`zero_grad`, `WindowBatches.micro_batches`, `LRScheduler.step`, `MetricsLog.append`,
`torch.Tensor.backward`, `F.cross_entropy`, `F.scaled_dot_product_attention`, llmctl's rotary
functions, torch.nn.utils' clipping functions, and `Tensor.item` / `Tensor.__float__` when the loop
itself calls them), and the plain loop's own `phase` labels on the reference side.

It prints, per worker: the step time unprofiled and profiled (the profiler's overhead); the step
split into phases (each op counted once, under its innermost label; a label's own time is the
Python between its ops); forward and backward by model part (a backward node is charged to the
part whose forward op made it, matched by the autograd sequence number); and the top operators by
self CPU time. Then, per shape, the two sides' phases side by side.

Times are ms per step on a shared 2-core machine: the shares and the llmctl - reference differences
are the result, the absolute figures are context (benchmarks/bench_train.py gives the interleaved
throughput ratios). The load average before and after is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.profiler import record_function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train as bt  # noqa: E402  (the reference model, its loop, the recipe and the dataset)

SHAPES = {"tiny": (bt.TINY, 16), "d512": (bt.WIDE, 8)}
LOG_EVERY = 10  # tiny-gpt.yaml's

# Innermost label -> the phase its own time belongs to. Labels not listed are their own phase.
PHASE_OF = {
    "data": "data",
    "forward": "forward: other (residual adds, positions, module calls)",
    "fwd.embedding": "forward: embedding",
    "fwd.norm": "forward: norms",
    "fwd.attn": "forward: attention views/transposes",
    "fwd.attn.proj": "forward: attention projections (matmul)",
    "fwd.attn.rotary": "forward: rotary",
    "fwd.attn.sdpa": "forward: SDPA",
    "fwd.mlp": "forward: MLP activation (SwiGLU / GELU)",
    "fwd.mlp.proj": "forward: MLP projections (matmul)",
    "fwd.lm_head": "loss head: lm_head matmul",
    "loss": "loss head: cross-entropy",
    "loss.cross_entropy": "loss head: cross-entropy",
    "backward.autograd": "backward (autograd)",
    "backward": "accelerate wrappers",
    "accelerate.accumulate": "accelerate wrappers",
    "clip": "accelerate wrappers",
    "optimizer": "accelerate wrappers",
    "optimizer.zero_grad": "accelerate wrappers",
    "clip.torch": "clip_grad_norm_",
    "clip.norm": "clip_grad_norm_",
    "clip.scale": "clip_grad_norm_",
    "Optimizer.step#AdamW.step": "optimizer (AdamW step)",
    "loop.optimizer": "optimizer (AdamW step)",
    "Optimizer.zero_grad#AdamW.zero_grad": "optimizer (zero_grad)",
    "scheduler": "lr scheduler",
    "host_sync": "host syncs (.item / float)",
    "logging.reduce": "logging (reduce, metrics row)",
    "logging.metrics_write": "logging (reduce, metrics row)",
    "step": "other (loop Python, unlabelled ops)",
}
PHASE_ORDER = list(dict.fromkeys(PHASE_OF.values()))

# The model part a label stands for in the forward + backward table.
PART_OF = {
    "fwd.embedding": "embedding",
    "fwd.norm": "norms",
    "fwd.attn": "attention views",
    "fwd.attn.proj": "attention projections",
    "fwd.attn.rotary": "rotary",
    "fwd.attn.sdpa": "SDPA",
    "fwd.mlp": "MLP activation",
    "fwd.mlp.proj": "MLP projections",
    "fwd.lm_head": "lm_head",
    "loss": "cross-entropy",
    "loss.cross_entropy": "cross-entropy",
    "forward": "residual / other",
}


# --------------------------------------------------------------------------- labels from outside


class Labels:
    """`record_function` labels opened and closed from hooks; `depth` is how many of ours are open."""

    def __init__(self) -> None:
        self.open: list[Any] = []

    @property
    def depth(self) -> int:
        return len(self.open)

    def enter(self, name: str) -> None:
        rf = record_function(name)
        rf.__enter__()
        self.open.append(rf)

    def exit(self) -> None:
        self.open.pop().__exit__(None, None, None)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, owner: Any, attr: str, name: str, *, only_outside: bool = False) -> None:
        """Replace owner.attr by a wrapper that runs it under label `name` (with only_outside, only when
        no label of ours is open: the loop's own host syncs, not those inside the optimizer)."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            if only_outside and self.depth:
                return fn(*args, **kwargs)
            with self.region(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, labelled)

    def wrap_contextmanager(self, owner: Any, attr: str, name: str) -> None:
        """Label the entry and the exit of a context-manager method, not the body it wraps."""
        fn = getattr(owner, attr)

        @contextlib.contextmanager
        def labelled(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self.region(name):
                cm = fn(*args, **kwargs)
                value = cm.__enter__()
            try:
                yield value
            finally:
                with self.region(name):
                    cm.__exit__(None, None, None)

        setattr(owner, attr, labelled)

    def hook_module(self, module: nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda m, args: self.enter(name))
        module.register_forward_hook(lambda m, args, out: self.exit())


def label_common(labels: Labels) -> None:
    """Labels both sides share: torch functions and methods, wrapped once per process."""
    import torch.nn.utils as nn_utils

    labels.wrap(F, "cross_entropy", "loss.cross_entropy")
    labels.wrap(F, "scaled_dot_product_attention", "fwd.attn.sdpa")
    labels.wrap(torch.Tensor, "backward", "backward.autograd")
    labels.wrap(nn_utils, "clip_grad_norm_", "clip.torch")
    labels.wrap(nn_utils, "get_total_norm", "clip.norm")
    labels.wrap(nn_utils, "clip_grads_with_norm_", "clip.scale")
    labels.wrap(torch.Tensor, "item", "host_sync", only_outside=True)
    labels.wrap(torch.Tensor, "__float__", "host_sync", only_outside=True)


def label_llmctl(labels: Labels) -> None:
    """Labels of llmctl's loop: Accelerate's wrappers, the data, the scheduler, the metrics log, and the
    model's parts (hooks added to the model build_model returns)."""
    import accelerate
    import accelerate.optimizer

    import llmctl.models
    import llmctl.models.gpt as gpt
    from llmctl.training.batches import WindowBatches
    from llmctl.training.checkpoints import MetricsLog

    labels.wrap_contextmanager(accelerate.Accelerator, "accumulate", "accelerate.accumulate")
    labels.wrap(accelerate.Accelerator, "backward", "backward")
    labels.wrap(accelerate.Accelerator, "clip_grad_norm_", "clip")
    labels.wrap(accelerate.Accelerator, "reduce", "logging.reduce")
    labels.wrap(accelerate.optimizer.AcceleratedOptimizer, "step", "optimizer")
    labels.wrap(accelerate.optimizer.AcceleratedOptimizer, "zero_grad", "optimizer.zero_grad")
    labels.wrap(torch.optim.lr_scheduler.LRScheduler, "step", "scheduler")
    labels.wrap(WindowBatches, "micro_batches", "data")
    labels.wrap(MetricsLog, "append", "logging.metrics_write")
    labels.wrap(gpt, "apply_rotary", "fwd.attn.rotary")
    labels.wrap(gpt, "rotary_cos_sin", "fwd.attn.rotary")
    build = llmctl.models.build_model

    def build_labelled(config: dict) -> nn.Module:
        model = build(config)
        hook_parts(labels, model, {gpt.RMSNorm: "fwd.norm", gpt.Attention: "fwd.attn", gpt.MLP: "fwd.mlp"})
        return model

    llmctl.models.build_model = build_labelled


def hook_parts(labels: Labels, model: nn.Module, kinds: dict[type, str]) -> None:
    """Forward labels on the model and its parts: the module classes in `kinds`, embeddings, lm_head,
    and the Linear layers inside attention (`fwd.attn.proj`) and the MLP (`fwd.mlp.proj`)."""
    labels.hook_module(model, "forward")
    for name, module in model.named_modules():
        label = kinds.get(type(module))
        if label:
            labels.hook_module(module, label)
            for child in module.modules():
                if isinstance(child, nn.Linear):
                    labels.hook_module(child, label + ".proj")
        elif isinstance(module, nn.Embedding):
            labels.hook_module(module, "fwd.embedding")
        elif name.endswith("lm_head"):
            labels.hook_module(module, "fwd.lm_head")


# --------------------------------------------------------------------------- the profiled run


class StepProfiler:
    """Steps 1..warmup untimed, then `timed` steps with wall times, then `profiled` steps under the
    torch profiler (its schedule: wait through the first two stretches, one warm-up step, record)."""

    def __init__(self, warmup: int, timed: int, profiled: int):
        self.warmup, self.timed, self.profiled = warmup, timed, profiled
        self.total = warmup + timed + profiled
        self.ends: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.result: dict[str, Any] = {}
        schedule = torch.profiler.schedule(wait=warmup + timed - 1, warmup=1, active=profiled, repeat=1)
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule,
                                           on_trace_ready=self._ready)

    def start(self) -> None:
        self.prof.start()
        self.ends[0], self.cpu[0] = time.perf_counter(), time.process_time()

    def step(self, step: int) -> None:
        self.ends[step], self.cpu[step] = time.perf_counter(), time.process_time()
        self.prof.step()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.prof.stop()

    def _ready(self, prof: torch.profiler.profile) -> None:
        self.result = summarize_events(prof.events(), self.profiled)

    def step_times(self) -> dict[str, float]:
        """Median ms per step of the timed (unprofiled) and the profiled steps, and the process's CPU
        seconds per wall second over the timed steps (below the thread count when crowded out)."""
        def med(lo: int, hi: int) -> float:
            return 1e3 * statistics.median(self.ends[i] - self.ends[i - 1] for i in range(lo, hi + 1))

        w, t = self.warmup, self.timed
        cpu_per_wall = (self.cpu[w + t] - self.cpu[w]) / (self.ends[w + t] - self.ends[w])
        return {"unprofiled_ms": med(w + 1, w + t), "profiled_ms": med(w + t + 1, self.total), "cpu_per_wall": cpu_per_wall}


def run_llmctl(spec: dict, steps: StepProfiler) -> None:
    from llmctl.training.trainer import TrainCallbacks, train

    labels = Labels()
    label_common(labels)
    label_llmctl(labels)
    model, batch = SHAPES[spec["shape"]]
    bench_spec = {"dataset": spec["dataset"], "model": model, "batch": batch, "precision": "fp32",
                  "warmup": steps.warmup + steps.timed, "steps": steps.profiled}
    recipe = bt.llmctl_recipe(bench_spec, log_every=LOG_EVERY)

    class Hook(TrainCallbacks):
        def on_start(self, info: dict[str, Any]) -> None:
            steps.start()

        def on_step(self, step: int, row: dict[str, Any] | None) -> None:
            steps.step(step)

    with tempfile.TemporaryDirectory(prefix="profile-train-run-") as tmp:
        train(recipe, Path(tmp) / "run", callbacks=Hook())
    steps.stop()


def run_reference(spec: dict, steps: StepProfiler) -> None:
    labels = Labels()
    label_common(labels)
    model_shape, batch = SHAPES[spec["shape"]]
    data = bt.TrainTokens(Path(spec["dataset"]))
    model, _ = bt.build_plain_model("ref", model_shape, data.vocab_size)
    hook_parts(labels, model, {bt.RefLayerNorm: "fwd.norm", bt.RefAttention: "fwd.attn", bt.RefMLP: "fwd.mlp"})
    optimizer = bt.adamw(list(model.parameters()))
    loop_spec = {"model": model_shape, "batch": batch, "precision": "fp32", "warmup": steps.total, "steps": 0}
    # The loop's phases that the wrapped functions above do not label themselves.
    loop_labels = {"data": "data", "loss": "loss", "optimizer": "loop.optimizer"}

    def phase(name: str) -> contextlib.AbstractContextManager:
        return labels.region(loop_labels[name]) if name in loop_labels else contextlib.nullcontext()

    steps.start()
    bt.plain_loop(model, optimizer, data, loop_spec, steps.step, phase)
    steps.stop()


# --------------------------------------------------------------------------- reading the trace


def _is_label(name: str) -> bool:
    return name in PHASE_OF or name.startswith(("Optimizer.step#", "Optimizer.zero_grad#"))


def summarize_events(events: list[Any], n_steps: int) -> dict[str, Any]:
    """Phases, model parts (forward and backward) and top self-CPU operators, in ms per step."""
    per_step = 1e-3 / n_steps  # us in total -> ms per step
    roots = [e for e in events if e.name.startswith("ProfilerStep")]
    step_total = sum(e.cpu_time_total for e in roots)
    phases: dict[str, float] = defaultdict(float)
    fwd_parts: dict[str, float] = defaultdict(float)
    bwd_parts: dict[str, float] = defaultdict(float)
    bwd_nodes: dict[str, float] = defaultdict(float)
    part_of_seq: dict[int, str] = {}
    backward_nodes: list[tuple[Any, int]] = []

    def walk(e: Any, label: str, in_backward: bool) -> None:
        """Charge e's self time to its innermost label; note forward ops' sequence numbers (an op that makes
        no autograd node shows the next node's number, so the op that shows it last is its maker)."""
        name = e.name
        if name.startswith("ProfilerStep"):
            name = "step"
        if _is_label(name) or name == "step":
            label = name
        if name == "backward.autograd":
            in_backward = True
        seq = getattr(e, "sequence_nr", -1)
        if not in_backward and seq is not None and seq >= 0 and label in PART_OF:
            part_of_seq[seq] = PART_OF[label]  # the last op to show a number is the one that made the node
        if in_backward and name.startswith("autograd::engine::evaluate_function: "):
            backward_nodes.append((e, seq))
            bwd_nodes[name.split(": ", 1)[1]] += e.cpu_time_total
        phase = PHASE_OF.get(label) or ("optimizer (AdamW step)" if label.startswith("Optimizer.step#") else
                                         "optimizer (zero_grad)")
        phases[phase] += e.self_cpu_time_total
        if not in_backward and label in PART_OF:
            fwd_parts[PART_OF[label]] += e.self_cpu_time_total
        for child in e.cpu_children:
            walk(child, label, in_backward)

    for root in roots:
        walk(root, "step", False)
    for e, seq in backward_nodes:
        part = part_of_seq.get(seq) if seq is not None and seq >= 0 else None
        if part is None:
            part = "AccumulateGrad" if "AccumulateGrad" in e.name else "unmatched"
        bwd_parts[part] += e.cpu_time_total
    ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.name.startswith("ProfilerStep") or _is_label(e.name):
            continue
        ops[e.name][0] += e.self_cpu_time_total
        ops[e.name][1] += 1
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])
    return {
        "step_ms": step_total * per_step,
        "phases_ms": {k: v * per_step for k, v in phases.items()},
        "forward_parts_ms": {k: v * per_step for k, v in fwd_parts.items()},
        "backward_parts_ms": {k: v * per_step for k, v in bwd_parts.items()},
        "backward_nodes_ms": {k: v * per_step for k, v in sorted(bwd_nodes.items(), key=lambda kv: -kv[1])[:25]},
        "top_ops": [{"name": k, "self_ms": v[0] * per_step, "calls": v[1] / n_steps} for k, v in top[:40]],
    }


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    steps = StepProfiler(spec["warmup"], spec["timed"], spec["profiled"])
    cpu0 = time.process_time()
    (run_llmctl if spec["side"] == "llmctl" else run_reference)(spec, steps)
    return {**steps.result, **steps.step_times(), "threads": torch.get_num_threads(),
            "cpu_s": time.process_time() - cpu0}


# --------------------------------------------------------------------------- driver and tables


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"profile_train: worker {spec['side']} {spec['shape']} failed (exit {proc.returncode})")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def print_worker(title: str, r: dict, rows: int) -> None:
    step = r["step_ms"]
    if r["cpu_per_wall"] < 0.8 * r["threads"]:
        print(f"\n!!! {title}: CROWDED OUT (CPU/wall {r['cpu_per_wall']:.2f} with {r['threads']} threads): "
              "another process held the cores; rerun for a profile worth reading")
    print(f"\n=== {title}: {r['unprofiled_ms']:.1f} ms/step unprofiled, {r['profiled_ms']:.1f} profiled "
          f"(profiler overhead {r['profiled_ms'] / r['unprofiled_ms']:.2f}x), {step:.1f} ms in ProfilerStep, "
          f"{r['threads']} threads, CPU/wall {r['cpu_per_wall']:.2f}")
    print(f"{'phase':58s} {'ms/step':>8s} {'share':>7s}")
    for name in PHASE_ORDER:
        v = r["phases_ms"].get(name, 0.0)
        if v >= 0.005:
            print(f"  {name:56s} {v:8.2f} {100 * v / step:6.1f}%")
    print(f"{'model part':28s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s} {'share':>7s}")
    parts = set(r["forward_parts_ms"]) | set(r["backward_parts_ms"])
    totals = {p: r["forward_parts_ms"].get(p, 0.0) + r["backward_parts_ms"].get(p, 0.0) for p in parts}
    for p in sorted(parts, key=lambda p: -totals[p]):
        f, b = r["forward_parts_ms"].get(p, 0.0), r["backward_parts_ms"].get(p, 0.0)
        print(f"  {p:26s} {f:8.2f} {b:8.2f} {totals[p]:8.2f} {100 * totals[p] / step:6.1f}%")
    print(f"{'top operators by self CPU':58s} {'calls/step':>10s} {'ms/step':>8s} {'share':>7s}")
    for op in r["top_ops"][:rows]:
        print(f"  {op['name'][:56]:56s} {op['calls']:10.1f} {op['self_ms']:8.2f} {100 * op['self_ms'] / step:6.1f}%")


def print_side_by_side(shape: str, a: dict, b: dict) -> None:
    print(f"\n=== {shape}: llmctl vs reference, ms per profiled step (shares of each side's step)")
    print(f"{'phase':58s} {'llmctl':>8s} {'share':>7s} {'ref':>8s} {'share':>7s} {'llmctl-ref':>10s}")
    for name in PHASE_ORDER:
        x, y = a["phases_ms"].get(name, 0.0), b["phases_ms"].get(name, 0.0)
        if max(x, y) >= 0.005:
            print(f"  {name:56s} {x:8.2f} {100 * x / a['step_ms']:6.1f}% {y:8.2f} {100 * y / b['step_ms']:6.1f}% "
                  f"{x - y:10.2f}")
    print(f"  {'step (in ProfilerStep)':56s} {a['step_ms']:8.2f} {'':7s} {b['step_ms']:8.2f} {'':7s} "
          f"{a['step_ms'] - b['step_ms']:10.2f}")
    print(f"  unprofiled step: llmctl {a['unprofiled_ms']:.1f} ms, reference {b['unprofiled_ms']:.1f} ms "
          f"(ratio {a['unprofiled_ms'] / b['unprofiled_ms']:.2f}; not interleaved: bench_train.py has the ratio)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,d512", help="comma-separated: tiny, d512")
    ap.add_argument("--sides", default="llmctl,ref", help="comma-separated: llmctl, ref")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--timed", type=int, default=10, help="steps timed without the profiler")
    ap.add_argument("--profiled", type=int, default=10, help="steps under the profiler")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--rows", type=int, default=20, help="top operators to print")
    ap.add_argument("--dataset", type=Path, default=None, help="a prepared dataset dir (default: prepare 3 MB in a temp dir)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    load_before = os.getloadavg()
    print(f"profile_train on {bt.cpu_model()}; load average before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="profile-train-data-") as tmp:
        dataset = args.dataset or Path(tmp) / "data"
        if args.dataset is None:
            bt.prepare(dataset)
        results: dict[str, dict[str, dict]] = defaultdict(dict)
        for shape in args.shapes.split(","):
            for side in args.sides.split(","):
                spec = {"side": side, "shape": shape, "dataset": str(dataset), "warmup": args.warmup,
                        "timed": args.timed, "profiled": args.profiled, "threads": args.threads}
                results[shape][side] = r = run_worker(spec)
                print_worker(f"{side} {shape}", r, args.rows)
    for shape, sides in results.items():
        if {"llmctl", "ref"} <= set(sides):
            print_side_by_side(shape, sides["llmctl"], sides["ref"])
    load_after = os.getloadavg()
    print(f"\nload average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"cpu": bt.cpu_model(), "load_before": load_before,
                                             "load_after": load_after, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
