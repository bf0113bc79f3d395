#!/usr/bin/env python
"""Which of PyTorch's own speed-ups pay for llmctl's `gpt` training step on this machine, in one process.

    .venv/bin/python benchmarks/bench_train_variants.py [--rounds 6] [--steps 5] [--compile] [--d-model 128]

Every variant's model and optimizer is built once (same seed, same batch); each round times `--steps`
steps of every variant after 2 untimed ones, the order reversed every other round so drift cancels;
the median ms per step is printed with its ratio to the per-tensor AdamW loop. Variants: AdamW's
per-tensor loop, foreach and fused implementations; with `--compile`, `torch.compile(model)` beside
eager (its first step, the compilation, is printed apart). The step is a plain loop (forward,
cross-entropy, backward, clip 1.0, step, zero_grad): llmctl's trainer adds under 1% to it
(bench_train.py's llmctl / plain-loop row).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also torch.compile(model) with the fused optimizer")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from llmctl.models.gpt import GPT, GPTConfig

    d = args.d_model
    cfg = GPTConfig(n_layer=4, n_head=max(4, d // 64), d_model=d, context_length=128, vocab_size=4096)
    batch = 16 if d <= 128 else 8
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=torch.Generator().manual_seed(0))

    def build(optimizer: str, compiled: bool):
        torch.manual_seed(0)
        model = GPT(cfg).train()
        kwargs = {"fused": True} if optimizer == "fused" else {"foreach": optimizer == "foreach"}
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)
        return (torch.compile(model) if compiled else model), model, opt

    def step(forward, model, opt) -> float:
        logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    variants = [("AdamW per-tensor loop", "loop", False), ("AdamW foreach", "foreach", False),
                ("AdamW fused", "fused", False)]
    if args.compile:
        variants.append(("AdamW fused + torch.compile(model)", "fused", True))
    built = {name: build(opt, compiled) for name, opt, compiled in variants}
    for name, _, compiled in variants:
        if compiled:
            t0 = time.perf_counter()
            step(*built[name])
            print(f"{name}: first step (compilation) {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, _, _ in order:
            for _ in range(2):
                step(*built[name])
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*built[name])
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times[variants[0][0]])
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"4 layers, d {d}, batch {batch} x {cfg.context_length}, vocab {cfg.vocab_size}; "
          f"{args.rounds} rounds x {args.steps} steps")
    for name, _, _ in variants:
        median = statistics.median(times[name])
        print(f"  {name:<36} {median * 1000:8.1f} ms/step   {base / median:5.3f}x the per-tensor loop")


if __name__ == "__main__":
    main()
