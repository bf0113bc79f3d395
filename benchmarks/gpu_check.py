"""GPU check on an NVIDIA machine: gpt-124m in bf16 with torch.compile through llmctl's own trainer.

Prints tokens/s and model FLOPs utilisation (MFU) against the datasheet dense bf16 peak
(989 TFLOP/s for H100/H200 SXM; --peak-tflops for other GPUs) and against a bf16 matrix
product timed in the same run, then (with two or more GPUs) the 2-process DDP check:
`llmctl train --nproc 2` with SGD against one process on the same global batch.
Run it through benchmarks/gpu_check.sh; it writes its figures to --out as JSON too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def flops_per_token(cfg: dict, params: int) -> float:
    """6 N per token for the dense weights plus 6 L T d for attention scores and values (PaLM's count)."""
    return 6 * params + 6 * cfg["n_layer"] * cfg["context_length"] * cfg["d_model"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per step (1024 tokens each)")
    ap.add_argument("--micro-batch-size", type=int, default=32)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="Skip the memory-plan checks.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from llmctl.config import load_recipe
    from llmctl.config.schema import DataConfig
    from llmctl.data.prepare import prepare_dataset
    from llmctl.training.trainer import TrainCallbacks, train

    assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="llmctl-gpu-check-"))
    os.chdir(work)
    t0 = time.perf_counter()
    data = DataConfig(sources=["builtin:stdlib"], vocab_size=32768, max_bytes=12_000_000)
    prepare_dataset(data, work / "data", seed=0)
    print(f"prepared 12 MB of builtin:stdlib in {time.perf_counter() - t0:.0f} s", flush=True)

    overrides = [
        "data.dir=data", "data.vocab_size=32768", "data.max_bytes=12000000",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.micro_batch_size={args.micro_batch_size}", "train.precision=bf16",
        f"train.compile={'false' if args.no_compile else 'true'}", "train.warmup_steps=5",
        f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "train.log_every=1",
    ]
    recipe = load_recipe(REPO / "recipes/gpt-124m.yaml", overrides)

    class Timer(TrainCallbacks):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.params = 0

        def on_start(self, info: dict) -> None:
            self.params = info["parameters"]

        def on_step(self, step: int, row: dict | None) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = Timer()
    train(recipe, work / "runs/gpt-124m", callbacks=timer)
    steady = [b - a for a, b in zip(timer.times[10:], timer.times[11:])]  # skip compile and warm-up
    step_s = statistics.median(steady)
    tokens_per_step = args.batch_size * recipe.model.context_length
    tok_s = tokens_per_step / step_s
    model_cfg = recipe.model.model_dump()
    achieved = tok_s * flops_per_token(model_cfg, timer.params) / 1e12
    measured_peak = matmul_tflops()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": name,
        "gpus": gpus,
        "torch": torch.__version__,
        "parameters": timer.params,
        "tokens_per_step": tokens_per_step,
        "median_step_s": step_s,
        "tokens_per_s": tok_s,
        "model_tflops": achieved,
        "mfu_datasheet": achieved / args.peak_tflops,
        "matmul_bf16_tflops": measured_peak,
        "mfu_measured_matmul": achieved / measured_peak,
        "compile": not args.no_compile,
    }
    print(
        f"\n{name} x{gpus}, torch {torch.__version__}: gpt-124m bf16{' + compile' if not args.no_compile else ''}, "
        f"{tokens_per_step:,} tokens/step\n"
        f"  tokens/s {tok_s:,.0f}   model {achieved:.0f} TFLOP/s\n"
        f"  MFU {100 * result['mfu_datasheet']:.1f}% of the {args.peak_tflops:.0f} TFLOP/s datasheet peak "
        f"(target >= 45%), {100 * result['mfu_measured_matmul']:.1f}% of a bf16 8192^3 matmul timed here "
        f"({measured_peak:.0f} TFLOP/s)",
        flush=True,
    )

    if not args.skip_memory:
        result.update(memory_checks(REPO, work))

    if gpus >= 2:
        tiny = ["--run-dir", "runs/ddp", "data.dir=data", "data.vocab_size=32768", "data.max_bytes=12000000",
                "model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.context_length=128",
                "train.max_steps=10", "train.batch_size=16", "train.micro_batch_size=4", "train.optimizer=sgd",
                "train.schedule=constant", "train.warmup_steps=0", "train.precision=fp32", "train.eval_every=10",
                "train.checkpoint_every=10"]
        llmctl = [sys.executable, "-m", "llmctl", "train", str(REPO / "recipes/gpt-124m.yaml")]
        one = subprocess.run(llmctl + tiny[:1] + ["runs/one"] + tiny[2:], capture_output=True, text=True)
        two = subprocess.run(llmctl + tiny + ["--nproc", "2"], capture_output=True, text=True)
        from safetensors.torch import load_file

        ok = one.returncode == 0 and two.returncode == 0
        diff = None
        if ok:
            a = load_file("runs/one/checkpoints/step-10/model.safetensors")
            b = load_file("runs/ddp/checkpoints/step-10/model.safetensors")
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        result["ddp_2gpu_max_weight_diff"] = diff
        print(f"  DDP 2 GPUs (NCCL) vs 1 GPU, SGD 10 steps: {'max weight diff %.2e' % diff if ok else 'FAILED'}")
        if not ok:
            print(two.stderr[-3000:])
    else:
        print("  DDP check skipped: one GPU")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def memory_checks(repo: Path, work: Path) -> dict:
    """The memory plan against CUDA's measured peak, and `micro_batch_size: auto` under a budget.

    Each is a 3-step gpt-124m bf16 run without compile; the peak is torch.cuda.max_memory_allocated
    over the whole run (model, optimizer state and the steps), the plan's peak is what `--plan` prints.
    """
    import torch

    from llmctl.config import load_recipe
    from llmctl.training.trainer import TrainCallbacks, train

    class Plan(TrainCallbacks):
        info: dict = {}

        def on_start(self, info: dict) -> None:
            self.info = info

    common = ["data.dir=data", "data.vocab_size=32768", "data.max_bytes=12000000", "train.max_steps=3",
              "train.precision=bf16", "train.compile=false", "train.warmup_steps=1", "train.eval_every=3",
              "train.checkpoint_every=3", "train.eval_batches=1"]
    out: dict = {}
    for label, extra in (("fixed", ["train.batch_size=16", "train.micro_batch_size=16"]),
                         ("auto_24GiB", ["train.batch_size=256", "train.micro_batch_size=auto", "train.max_memory=24GiB"])):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        plan = Plan()
        recipe = load_recipe(repo / "recipes/gpt-124m.yaml", common + extra)
        train(recipe, work / f"runs/mem-{label}", callbacks=plan, overwrite=True)
        measured = torch.cuda.max_memory_allocated()
        estimated = plan.info["plan"].peak_bytes
        out[f"memory_{label}"] = {
            "micro_batch_size": plan.info["micro_batch_size"],
            "estimated_peak_bytes": estimated,
            "measured_peak_bytes": measured,
            "measured_over_estimated": measured / estimated,
        }
        print(f"  memory ({label}): micro-batch {plan.info['micro_batch_size']}, plan {estimated / 2**30:.2f} GiB, "
              f"measured peak {measured / 2**30:.2f} GiB ({measured / estimated:.3f}x)", flush=True)
    return out


if __name__ == "__main__":
    main()
