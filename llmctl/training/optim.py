"""Optimizers and learning-rate schedules built from the recipe's `train` section."""

from __future__ import annotations

import math

import torch

from llmctl.config.schema import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); leave norms and biases undecayed. Frozen parameters
    (all but the adapters of a LoRA run) are left out, so the optimizer keeps no state for them."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_kernel_applies(groups: list[dict]) -> bool:
    """True when torch's fused Adam/AdamW kernel can take every parameter: floating point, plain tensors
    (not DTensor shards), on a device torch has the kernel for (CPU and CUDA among them)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in devices for p in params
    )


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over `parameter_groups`. Adam and AdamW use torch's fused kernel where it
    applies: one kernel for the whole update instead of about ten per parameter tensor (measured in
    BENCHMARKS.md; its results differ from the per-tensor loop's by rounding only)."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer in ("adamw", "adam"):
        kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return kind(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused_kernel_applies(groups) or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Share of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))


def l1_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Sum of |w| over trained weight matrices (not norms, not frozen ones), each shared tensor counted once."""
    seen, total = set(), None
    for p in model.parameters():
        if p.dim() < 2 or not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        term = p.abs().sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
