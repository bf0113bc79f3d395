#!/usr/bin/env python
"""Training throughput of llmctl against a plain loop and a textbook GPT-2-style reference, in one run.

    .venv/bin/python benchmarks/bench_train.py [--steps N] [--rounds R] [--quick] [--no-wide] [--json-out FILE]

What it compares (each measurement in a FRESH subprocess: this script re-invoked with
`--worker SPEC --json`; the measurements of a round run one after another, each pair's order is
reversed every other round, A B / B A, so slow drift cancels; the pairs that need precision run
A B B A / B A A B, two processes each per round, since fresh processes of the same job differ by a
few percent):

1. llmctl against the textbook reference, fp32, at the tiny shape (4 layers, d_model 128, 4 heads,
   context 128, vocab 4096, batch 16 x 128) and at d_model 512 (4 layers, 8 heads, context 128,
   batch 8 x 128): `llmctl.training.trainer.train` (the real engine, Accelerate and all, llmctl's
   Llama-style `gpt`: RMSNorm, rotary, SwiGLU with d_ff = 8/3 d rounded up to 64) against
   `RefGPT`, written below: nanoGPT's model.py shape as its train.py runs it (LayerNorm without
   bias, learned positions, fused q/k/v projection, GELU MLP of width 4 d, no biases, tied
   embeddings, causal SDPA, nanoGPT's init), trained by `plain_loop` (no llmctl code, no
   Accelerate). Both sides: AdamW over the same kind of groups (matrices and embeddings decayed,
   norms not), the same lr / betas / eps / weight decay / grad clip 1.0, constant lr, seed 0, and
   the same random windows of the same train.bin (numpy memmap). Reported as the ratio of tokens/s
   and the ratio of achieved FLOP/s, each model counted with its own FLOPs per token (below).
   The issue's target: llmctl / reference >= 1.0 in tokens/s at the tiny shape.
2. fp32 d128: llmctl's train against `plain_loop` over llmctl's own model (`build_model`, same
   config and seed), which isolates the loop: target >= 0.97, and the same last loss on both sides.
3. The machine's peak: a 2048 x 2048 @ 2048 x 2048 matmul (fp32 and bf16, best of a few reps, same
   thread count), and the share of that peak each run reaches.
4. bf16 against fp32, both through llmctl's train (train.precision), at d_model 512 and, for
   contrast, at d_model 128. Only on a CPU with native bf16 (avx512_bf16 or amx_bf16) unless
   `--bf16 on`: without it a bf16 matmul runs ~20x slower than fp32 (an AMD EPYC with avx2 only:
   ~1 GFLOP/s), and these rows would take hours.

FLOPs per token, one formula for every model (nanoGPT's `estimate_mfu`, PaLM's appendix B):
6 N + 12 n_layer d_model ctx, with N = the parameters without the position embeddings (llmctl's
gpt has none; the tied token embedding is counted once, as the lm_head matmul it also is). The
second term counts the full ctx x ctx score and value matmuls, twice what causal attention needs;
the llmctl / reference FLOP/s ratio is also printed with it counted as 6 n_layer d_model ctx.

Timing: only steady-state steps. Each worker runs `warmup + steps` optimizer steps and times the
last `steps` of them by the wall clock between step ends: for llmctl between the calls of
`TrainCallbacks.on_step` (which train() makes after each optimizer + scheduler step, and after
writing the metrics row of a logging step), for the plain loop after each `zero_grad`. As a
cross-check the llmctl worker also reads `tokens_per_s` of its metrics.jsonl rows, skipping the
first window (log_every = warmup, so that window is exactly the warm-up). Evaluation and
checkpoints happen only after the last timed step (eval_every = checkpoint_every = max_steps).

The result is a set of ratios; absolute tokens/s are context only (another busy process on a
2-core machine slows PyTorch many times over, see shared/NOTES.md). The CPU model, the load
average before and after, and each worker's CPU time / wall time are printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED = 0
VOCAB = 4096
DATA_MAX_BYTES = 3_000_000
# The shared optimizer settings (tiny-gpt.yaml's, with a constant lr so the plain loop needs no schedule).
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
FLOPS_FORMULA = ("FLOPs/token = 6*N + 12*n_layer*d_model*ctx  (nanoGPT's estimate_mfu; N = parameters without "
                 "position embeddings, the tied embedding once)")

TINY = {"n_layer": 4, "n_head": 4, "d_model": 128, "context_length": 128}
WIDE = {"n_layer": 4, "n_head": 8, "d_model": 512, "context_length": 128}


def flops_per_token(n_params: int, model: dict, attention: int = 12) -> int:
    """Training FLOPs per token: 6 N + `attention` * n_layer * d_model * ctx (12: full T x T, 6: causal)."""
    return 6 * n_params + attention * model["n_layer"] * model["d_model"] * model["context_length"]


# --------------------------------------------------------------------------- the textbook reference


class RefLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias (nanoGPT's `bias=False`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class RefAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)  # q, k, v in one matmul
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class RefMLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class RefBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln_1 = RefLayerNorm(d_model)
        self.attn = RefAttention(d_model, n_head)
        self.ln_2 = RefLayerNorm(d_model)
        self.mlp = RefMLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    """GPT-2 as nanoGPT's model.py writes it (dropout 0, bias False, as its train.py defaults)."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, context_length: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context_length, d_model)
        self.h = nn.ModuleList(RefBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = RefLayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        T = idx.size(1)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def build_plain_model(kind: str, model: dict, vocab_size: int) -> tuple[nn.Module, int]:
    """The model a plain loop trains (`ref`: RefGPT; `plain`: llmctl's gpt) and its N for the FLOPs count."""
    torch.manual_seed(SEED)
    if kind == "ref":
        net = RefGPT(vocab_size, model["n_layer"], model["n_head"], model["d_model"], model["context_length"])
        return net, sum(p.numel() for p in net.parameters()) - net.wpe.weight.numel()
    from llmctl.config.schema import ModelConfig
    from llmctl.models import build_model

    config = ModelConfig(**_model_section(model)).model_dump()
    config["vocab_size"] = vocab_size
    net = build_model(config)
    return net, sum(p.numel() for p in net.parameters())


def adamw(params: list[nn.Parameter], **extra: Any) -> torch.optim.AdamW:
    """The benchmark's AdamW: matrices and embeddings decayed, gains and biases not (nanoGPT's rule, llmctl's too)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, **extra)


class TrainTokens:
    """train.bin of a dataset dir and the random windows llmctl's WindowBatches draws for each step."""

    def __init__(self, dataset: Path):
        import numpy as np

        meta = json.loads((dataset / "meta.json").read_text())
        self.vocab_size = int(meta["vocab_size"])
        n = meta["splits"]["train"]["tokens"]
        self.tokens = np.memmap(dataset / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(n,))

    def batch(self, step: int, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) int64 of optimizer step `step`."""
        import numpy as np

        starts = np.random.default_rng([SEED, step]).integers(0, len(self.tokens) - T - 1 + 1, size=B)
        block = torch.from_numpy(np.stack([np.asarray(self.tokens[s : s + T + 1], dtype=np.int64) for s in starts]))
        return block[:, :-1], block[:, 1:]


def no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def plain_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainTokens,
    spec: dict,
    on_step: Callable[[int], None],
    phase: Callable[[str], ContextManager] = no_phase,
) -> list[torch.Tensor]:
    """The textbook loop, `warmup + steps` steps: forward, cross-entropy, backward, clip, AdamW step,
    zero_grad; `on_step(step)` after each (1-based), `phase(name)` around each part (the profiler's
    labels). Returns the per-step losses (detached, no host sync in the loop)."""
    B, T = spec["batch"], spec["model"]["context_length"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = spec["precision"] == "bf16"
    model.train()
    losses = []
    for step in range(spec["warmup"] + spec["steps"]):
        with phase("data"):
            x, y = data.batch(step, B, T)
        with phase("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)  # (B, T, V)
        with phase("loss"):
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        with phase("backward"):
            loss.backward()
        with phase("clip"):
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        on_step(step + 1)
    return losses


# --------------------------------------------------------------------------- workers (fresh processes)


def _model_section(model: dict) -> dict:
    return {"family": "gpt", "dropout": 0.0, "vocab_size": None, **model}


def _threads(spec: dict) -> None:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))


def llmctl_recipe(spec: dict, **train_extra: Any) -> Any:
    """The recipe worker_llmctl trains: the spec's model and batch, the shared AdamW settings."""
    from llmctl.config.schema import Recipe

    warmup, total = spec["warmup"], spec["warmup"] + spec["steps"]
    return Recipe.model_validate(
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
                **train_extra,
            },
        }
    )


def worker_llmctl(spec: dict) -> dict:
    """Train through llmctl.training.trainer.train and time the steady-state steps."""
    from llmctl.training.trainer import TrainCallbacks, train

    _threads(spec)
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    recipe = llmctl_recipe(spec)

    class Clock(TrainCallbacks):
        def __init__(self) -> None:
            self.ends: dict[int, float] = {}
            self.cpu: dict[int, float] = {}
            self.info: dict[str, Any] = {}
            self.threads = 0

        def on_start(self, info: dict[str, Any]) -> None:
            self.info = info
            self.threads = torch.get_num_threads()

        def on_step(self, step: int, row: dict[str, Any] | None) -> None:
            self.ends[step] = time.perf_counter()
            self.cpu[step] = time.process_time()

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
    n_params = int(clock.info["parameters"])  # llmctl's gpt has no position embeddings
    step_times = [clock.ends[i] - clock.ends[i - 1] for i in range(warmup + 1, total + 1)]
    return {
        "tokens_per_s": steps * tokens_per_step / elapsed,
        "median_step_tokens_per_s": tokens_per_step / statistics.median(step_times),
        "metrics_tokens_per_s": win_tokens / win_time if win_time else None,
        "cpu_per_wall": (clock.cpu[total] - clock.cpu[warmup]) / elapsed,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "parameters": n_params,
        "flops_parameters": n_params,
        "flops_per_token": flops_per_token(n_params, spec["model"]),
        "flops_per_token_causal": flops_per_token(n_params, spec["model"], attention=6),
        "threads": clock.threads,
    }


def worker_plain(spec: dict) -> dict:
    """A plain loop, no llmctl training code and no Accelerate, over llmctl's model (`plain`) or RefGPT (`ref`)."""
    import random

    import numpy as np

    _threads(spec)
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    B, T = spec["batch"], spec["model"]["context_length"]
    random.seed(SEED)
    np.random.seed(SEED)
    data = TrainTokens(Path(spec["dataset"]))
    model, n_flops = build_plain_model(spec["kind"], spec["model"], data.vocab_size)
    params = list(model.parameters())  # unique tensors: the tied embedding appears once
    optimizer = adamw(params)
    ends: list[float] = []
    cpu: list[float] = []

    def on_step(step: int) -> None:
        ends.append(time.perf_counter())
        cpu.append(time.process_time())

    losses = plain_loop(model, optimizer, data, spec, on_step)
    step_times = [ends[i] - ends[i - 1] for i in range(warmup, total)]
    elapsed = ends[total - 1] - ends[warmup - 1]
    return {
        "tokens_per_s": steps * B * T / elapsed,
        "median_step_tokens_per_s": B * T / statistics.median(step_times),
        "cpu_per_wall": (cpu[total - 1] - cpu[warmup - 1]) / elapsed,
        # the mean over the last logging window, as llmctl's last metrics row has it
        "last_loss": round(float(torch.stack(losses[-(((total - 1) % warmup) + 1) :]).mean()), 6),
        "parameters": sum(p.numel() for p in params),
        "flops_parameters": n_flops,
        "flops_per_token": flops_per_token(n_flops, spec["model"]),
        "flops_per_token_causal": flops_per_token(n_flops, spec["model"], attention=6),
        "threads": torch.get_num_threads(),
    }


def worker_peak(spec: dict) -> dict:
    """Best-of-reps GFLOP/s of an n x n @ n x n matmul, fp32 (and bf16 when the spec asks)."""
    _threads(spec)
    n, reps = spec["n"], spec["reps"]
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, dtype in ((k, dtypes[k]) for k in spec["dtypes"]):
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


WORKERS = {"llmctl": worker_llmctl, "plain": worker_plain, "ref": worker_plain, "peak": worker_peak}


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


def cpu_model() -> str:
    """The CPU's model name and vector flags (Linux /proc/cpuinfo), and how many cores this process may use."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    vector = " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({vector}), {usable} of {os.cpu_count()} cores usable, torch {torch.__version__}"


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (avx512_bf16 or AMX), per /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in text.split() for flag in ("avx512_bf16", "amx_bf16"))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# (A, B, twice): one comparison block. Pairs run back to back, A B in even rounds and B A in odd
# ones; a pair measured twice runs A B B A (B A A B), because fresh processes of the same job
# differ by a few percent and these ratios are the ones that need the precision.
Block = tuple[str, str | None, bool]  # B None: a lone measurement (the peak matmul without bf16 rows)
LABELS = {
    ("llmctl_fp32_d128", "ref_fp32_d128"): "fp32 d128: llmctl / reference",
    ("llmctl_fp32_d512", "ref_fp32_d512"): "fp32 d512: llmctl / reference",
    ("llmctl_fp32_d128", "plain_fp32_d128"): "fp32 d128: llmctl / plain loop",
    ("llmctl_bf16_d512", "llmctl_fp32_d512"): "d512: llmctl bf16 / llmctl fp32",
    ("llmctl_bf16_d128", "llmctl_fp32_d128"): "d128: llmctl bf16 / llmctl fp32",
}


def build_specs(dataset: Path, args: argparse.Namespace) -> dict[str, dict]:
    q = args.quick
    steps = args.steps or (20 if q else 40)
    warmup = args.warmup or (5 if q else 10)
    wide_steps = args.wide_steps or (6 if q else 16)
    wide_warmup = args.wide_warmup or (2 if q else 4)
    base = {"dataset": str(dataset), "threads": args.threads}
    tiny = {**base, "model": TINY, "batch": 16, "warmup": warmup, "steps": steps, "precision": "fp32"}
    wide = {**base, "model": WIDE, "batch": 8, "warmup": wide_warmup, "steps": wide_steps, "precision": "fp32"}
    return {
        "llmctl_fp32_d128": {**tiny, "kind": "llmctl"},
        "ref_fp32_d128": {**tiny, "kind": "ref"},
        "plain_fp32_d128": {**tiny, "kind": "plain"},
        "llmctl_bf16_d128": {**tiny, "kind": "llmctl", "precision": "bf16"},
        "llmctl_fp32_d512": {**wide, "kind": "llmctl"},
        "ref_fp32_d512": {**wide, "kind": "ref"},
        "llmctl_bf16_d512": {**wide, "kind": "llmctl", "precision": "bf16"},
        "peak": {**base, "kind": "peak", "n": 2048, "reps": 4, "dtypes": ["fp32", "bf16"] if args.bf16_rows else ["fp32"]},
    }


def build_blocks(args: argparse.Namespace) -> list[Block]:
    blocks: list[Block] = [("llmctl_fp32_d128", "ref_fp32_d128", True)]
    if not args.no_plain:
        blocks.append(("llmctl_fp32_d128", "plain_fp32_d128", True))
    blocks.append(("llmctl_bf16_d128", "peak", False) if args.bf16_rows else ("peak", None, False))
    if not args.no_wide:
        blocks.append(("llmctl_fp32_d512", "ref_fp32_d512", True))
        if args.bf16_rows:
            blocks.append(("llmctl_bf16_d512", "llmctl_fp32_d512", False))
    return blocks


def run_rounds(specs: dict[str, dict], blocks: list[Block], rounds: int, t_start: float) -> list[dict[str, list[dict]]]:
    """Every block's measurements, round by round; results[i][name] lists block i's runs of `name`."""
    results: list[dict[str, list[dict]]] = [{n: [] for n in (a, b) if n} for a, b, _ in blocks]
    for r in range(rounds):
        for i, (a, b, twice) in enumerate(blocks):
            first, second = (a, b) if r % 2 == 0 else (b, a)
            order = (first, second, second, first) if twice else (first, second)
            for name in (n for n in order if n):
                out = run_worker(specs[name])
                out["round"] = r
                results[i][name].append(out)
                print(f"  round {r + 1}/{rounds} {name:18s} done ({time.perf_counter() - t_start:5.0f} s, "
                      f"load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps of the d128 runs (default 40, quick 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps of the d128 runs (default 10, quick 5)")
    ap.add_argument("--wide-steps", type=int, default=None, help="timed steps of the d512 runs (default 16, quick 6)")
    ap.add_argument("--wide-warmup", type=int, default=None, help="warm-up steps of the d512 runs (default 4, quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--no-wide", action="store_true", help="skip the d_model 512 comparisons (reference and bf16)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="the bf16 rows (auto: only on a CPU with avx512_bf16 or AMX)")
    ap.add_argument("--no-plain", action="store_true", help="skip llmctl against the plain loop over its own model")
    ap.add_argument("--profile", action="store_true",
                    help="run one llmctl fp32 d128 worker under cProfile (stats on stderr) and exit "
                         "(benchmarks/profile_train.py has the torch profiler's view)")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        result = WORKERS[spec["kind"]](spec)
        print(json.dumps(result))
        return

    rounds = args.rounds or (2 if args.quick else 3)
    args.bf16_rows = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16())
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    cpu = cpu_model()
    print(f"bench_train on {cpu}; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
          file=sys.stderr, flush=True)
    if not args.bf16_rows:
        print("bench_train: no bf16 rows (this CPU has no avx512_bf16 / AMX; --bf16 on forces them)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-train-data-") as tmp:
        dataset = Path(tmp) / "data"
        meta = prepare(dataset)
        specs = build_specs(dataset, args)
        if args.profile:
            spec = {**specs["llmctl_fp32_d128"], "profile": True}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--json"]
            subprocess.run(cmd, check=True, cwd=str(ROOT))
            return
        blocks = build_blocks(args)
        results = run_rounds(specs, blocks, rounds, t_start)

    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    report = summarize(results, blocks, specs, meta, rounds, load_before, load_after, elapsed)
    report["cpu"] = cpu
    print_table(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


def _tps(runs: list[dict], r: int | None = None) -> list[float]:
    return [x["tokens_per_s"] for x in runs if r is None or x["round"] == r]


def comparison(block: dict[str, list[dict]], a: str, b: str, rounds: int) -> dict:
    """Ratio of medians of A and B within one block, per-round ratios, and for two training runs the
    ratio of their achieved FLOP/s (tokens/s ratio times the ratio of their FLOPs per token)."""
    ta, tb = _tps(block[a]), _tps(block[b])
    per_round = [statistics.mean(_tps(block[a], r)) / statistics.mean(_tps(block[b], r)) for r in range(rounds)]
    out = {
        "label": LABELS.get((a, b), f"{a} / {b}"),
        "a": a,
        "b": b,
        "a_median_tokens_per_s": median(ta),
        "b_median_tokens_per_s": median(tb),
        "ratio": median(ta) / median(tb),
        "round_ratios": per_round,
        "median_round_ratio": median(per_round),
    }
    fa, fb = block[a][0].get("flops_per_token"), block[b][0].get("flops_per_token")
    if fa and fb:
        out["flops_ratio"] = out["ratio"] * fa / fb
        out["flops_ratio_causal"] = out["ratio"] * block[a][0]["flops_per_token_causal"] / block[b][0]["flops_per_token_causal"]
    return out


def summarize(results, blocks, specs, meta, rounds, load_before, load_after, elapsed) -> dict:
    pooled: dict[str, list[dict]] = {}
    for block in results:
        for name, runs in block.items():
            pooled.setdefault(name, []).extend(runs)
    peak = pooled["peak"]
    peak32 = median([p["fp32_gflops"] for p in peak])
    peak16 = median([p["bf16_gflops"] for p in peak]) if "bf16_gflops" in peak[0] else None
    comps = []
    for block, (a, b, _) in zip(results, blocks):
        if b is not None and "peak" not in (a, b):
            comps.append(comparison(block, a, b, rounds))
    if "llmctl_fp32_d128" in pooled and "llmctl_bf16_d128" in pooled:  # across blocks of the same rounds
        comps.append(comparison(pooled, "llmctl_bf16_d128", "llmctl_fp32_d128", rounds))
    runs = {}
    for name, rs in pooled.items():
        if name == "peak":
            continue
        spec = specs[name]
        med = median(_tps(rs))
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
            "flops_parameters": rs[0]["flops_parameters"],
            "flops_per_token": fpt,
            "tokens_per_s": _tps(rs),
            "median_tokens_per_s": med,
            "median_step_tokens_per_s": [x["median_step_tokens_per_s"] for x in rs],
            "metrics_tokens_per_s": [x.get("metrics_tokens_per_s") for x in rs] if spec["kind"] == "llmctl" else None,
            "cpu_per_wall": [round(x["cpu_per_wall"], 2) for x in rs],
            "achieved_gflops": med * fpt / 1e9,
            "share_of_fp32_peak": med * fpt / 1e9 / peak32,
            "share_of_own_precision_peak": med * fpt / 1e9 / peak_ref if peak_ref else None,
            "last_loss": sorted({x.get("last_loss") for x in rs}, key=lambda v: (v is None, v)),
            "threads": sorted({x["threads"] for x in rs}),
        }
    return {
        "rounds": rounds,
        "order": "one fresh process per measurement; per round, block by block: llmctl/reference fp32 d128 and "
        "llmctl/plain fp32 d128 as A B B A (B A A B in odd rounds), the peak matmul (beside bf16 d128 as A B when "
        "there are bf16 rows), then llmctl/reference fp32 d512 as A B B A and bf16/fp32 d512 "
        "as A B; each pair's order flipped every other round",
        "timing": "llmctl: wall time between TrainCallbacks.on_step calls after the warm-up steps (cross-check: "
        "metrics.jsonl tokens_per_s without its first, warm-up, window); plain and reference: wall time between "
        "step ends after the same warm-up",
        "flops_formula": FLOPS_FORMULA,
        "dataset": {"source": "builtin:stdlib", "max_bytes": DATA_MAX_BYTES, "vocab_size": meta["vocab_size"],
                    "train_tokens": meta["splits"]["train"]["tokens"]},
        "peak": {"matmul": "2048x2048 @ 2048x2048, best of 4 reps, median over rounds",
                 "fp32_gflops": peak32, "bf16_gflops": peak16, "threads": sorted({p["threads"] for p in peak})},
        "comparisons": comps,
        "runs": runs,
        "target_llmctl_over_plain": 0.97,
        "target_llmctl_over_reference": 1.0,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "elapsed_s": elapsed,
    }


def _describe(label: str, run: dict) -> str:
    m = run["model"]
    return (f"  {label}: {m['n_layer']}L d{m['d_model']} h{m['n_head']} ctx{m['context_length']}, batch {run['batch']}x"
            f"{m['context_length']}, {run['timed_steps']} timed steps after {run['warmup_steps']} warm-up")


def print_table(rep: dict) -> None:
    runs = rep["runs"]
    print()
    print(f"llmctl training throughput vs a textbook reference and a plain loop ({rep['rounds']} rounds, "
          "fresh process per measurement)")
    print(f"  CPU: {rep['cpu']}")
    print(f"  data: builtin:stdlib {rep['dataset']['max_bytes'] / 1e6:.0f} MB, vocab {rep['dataset']['vocab_size']}, "
          f"{rep['dataset']['train_tokens']:,} train tokens; AdamW lr {LR} betas {BETAS} wd {WEIGHT_DECAY}, "
          f"clip {GRAD_CLIP}, constant lr")
    for name, label in (("llmctl_fp32_d128", "d128"), ("llmctl_fp32_d512", "d512")):
        if name in runs:
            print(_describe(label, runs[name]))
    for name in ("llmctl_fp32_d128", "ref_fp32_d128", "llmctl_fp32_d512", "ref_fp32_d512"):
        if name in runs:
            r = runs[name]
            print(f"  {name}: {r['parameters'] / 1e6:.3f}M parameters, N = {r['flops_parameters']:,}, "
                  f"{r['flops_per_token'] / 1e6:.3f} MFLOP/token")
    print(f"  order: {rep['order']}")
    print(f"  timing: {rep['timing']}")
    threads = sorted({t for r in runs.values() for t in r["threads"]} | set(rep["peak"]["threads"]))
    lb, la = rep["load_average_before"], rep["load_average_after"]
    print(f"  torch threads in every worker: {threads}; load average (1, 5, 15 min) before {lb[0]:.2f} {lb[1]:.2f} "
          f"{lb[2]:.2f}, after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; total {rep['elapsed_s']:.0f} s")
    print()
    head = (f"{'comparison (A / B)':32s} {'A tok/s':>8s} {'B tok/s':>8s} {'tok/s ratio':>11s} {'FLOP/s ratio':>12s} "
            f"{'median of rounds':>16s}   per-round A/B")
    print(head)
    print("-" * len(head))
    for c in rep["comparisons"]:
        rr = " ".join(f"{x:.3f}" for x in c["round_ratios"])
        fr = f"{c['flops_ratio']:.3f}" if "flops_ratio" in c and c["a"].split("_")[0] != c["b"].split("_")[0] else "-"
        print(f"{c['label']:32s} {c['a_median_tokens_per_s']:8.0f} {c['b_median_tokens_per_s']:8.0f} "
              f"{c['ratio']:11.3f} {fr:>12s} {c['median_round_ratio']:16.3f}   {rr}")
    print()
    p = rep["peak"]
    bf16 = (f", bf16 {p['bf16_gflops']:.0f} GFLOP/s (bf16/fp32 {p['bf16_gflops'] / p['fp32_gflops']:.2f})"
            if p["bf16_gflops"] else " (no bf16 rows)")
    print(f"peak: {p['matmul']}: fp32 {p['fp32_gflops']:.0f} GFLOP/s{bf16}")
    print(rep["flops_formula"])
    head = (f"{'run':18s} {'n':>2s} {'MFLOP/tok':>9s} {'tok/s':>7s} {'min..max tok/s':>15s} {'GFLOP/s':>7s} "
            f"{'%fp32 peak':>10s} {'%own peak':>9s} {'cpu/wall':>9s}  last loss")
    print(head)
    print("-" * len(head))
    for name, r in runs.items():
        losses = " ".join("-" if x is None else f"{x:.4f}" for x in r["last_loss"])
        spread = f"{min(r['tokens_per_s']):.0f}..{max(r['tokens_per_s']):.0f}"
        cw = f"{min(r['cpu_per_wall']):.2f}..{max(r['cpu_per_wall']):.2f}"
        print(f"{name:18s} {len(r['tokens_per_s']):2d} {r['flops_per_token'] / 1e6:9.2f} {r['median_tokens_per_s']:7.0f} "
              f"{spread:>15s} {r['achieved_gflops']:7.1f} {100 * r['share_of_fp32_peak']:9.1f}% "
              f"{100 * (r['share_of_own_precision_peak'] or 0):8.1f}% {cw:>9s}  {losses}")
    print("(%own peak: against the matmul peak of the run's own precision; cpu/wall: the worker's CPU seconds per "
          "wall second over the timed steps, below the thread count when other processes crowd it out. One last loss "
          "shared by llmctl and plain at fp32 d128: same model, batches and updates.)")
    for c in rep["comparisons"]:
        if "flops_ratio_causal" in c and c["b"].startswith("ref_"):
            print(f"{c['label']}: FLOP/s ratio {c['flops_ratio']:.3f} (12 L d T attention term), "
                  f"{c['flops_ratio_causal']:.3f} (causal 6 L d T)")
    cross = runs["llmctl_fp32_d128"]["metrics_tokens_per_s"]
    if cross and all(cross):
        print(f"cross-check from metrics.jsonl tokens_per_s: llmctl fp32 d128 median {median(cross):.0f} tok/s")
    for c in rep["comparisons"]:
        if c["label"].startswith("fp32 d128: llmctl /"):
            a, b = runs[c["a"]], runs[c["b"]]
            med_step = median(a["median_step_tokens_per_s"]) / median(b["median_step_tokens_per_s"])
            print(f"cross-check from the median step time of each worker, {c['label']}: {med_step:.3f}")
    for c in rep["comparisons"]:
        target = {"ref_fp32_d128": rep["target_llmctl_over_reference"], "plain_fp32_d128": rep["target_llmctl_over_plain"]}
        if c["a"] == "llmctl_fp32_d128" and c["b"] in target:
            verdict = "meets" if c["ratio"] >= target[c["b"]] else "is BELOW"
            print(f"RESULT: {c['label']} = {c['ratio']:.3f} (ratio of medians): {verdict} the target {target[c['b']]}")


if __name__ == "__main__":
    main()
