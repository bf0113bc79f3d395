"""Plan a training step's memory before allocating any: weights, gradients, optimizer state, activations.

The figures come from the architecture of `llmctl.models.gpt` (its shape, a `GPTConfig`: the same
object the model is built from) and from what autograd saves for it, counted tensor by tensor (see
`_activation_bytes_per_token`), not from a factor fitted to one model; `tests/unit/test_memory.py`
checks them against a measured step.
On CPU a wrong batch size ends in the kernel's OOM kill, which nothing can catch, so the
trainer plans micro-batches from this estimate instead of trying and retrying.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from llmctl.config.schema import TrainConfig
from llmctl.errors import LlmctlError
from llmctl.models.shapes import GPTConfig, gpt_shape
from llmctl.units import human_bytes

# The recipe schema's choices, read from it: the list of optimizers (precisions, strategies) is written once.
OPTIMIZERS = typing.get_args(TrainConfig.model_fields["optimizer"].annotation)
PRECISIONS = typing.get_args(TrainConfig.model_fields["precision"].annotation)
STRATEGIES = typing.get_args(TrainConfig.model_fields["strategy"].annotation)

# Parameters, gradients and optimizer state stay fp32 under bf16/fp16 autocast (master weights).
_FP32 = 4


def optimizer_bytes_per_parameter(optimizer: str, momentum: float = 0.9) -> int:
    """Bytes of optimizer state per parameter: Adam(W) keeps two fp32 moments, SGD a momentum
    buffer (none without momentum), RMSprop its squared average plus a momentum buffer."""
    if optimizer in ("adamw", "adam"):
        return 2 * _FP32
    if optimizer == "sgd":
        return _FP32 if momentum > 0 else 0
    if optimizer == "rmsprop":
        return _FP32 + (_FP32 if momentum > 0 else 0)
    raise LlmctlError(f"train.optimizer: unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")


def _shape(model: GPTConfig | Mapping[str, Any]) -> GPTConfig:
    return gpt_shape(model, "plan memory")


def _activation_bytes_per_token(s: GPTConfig, precision: str, device_type: str) -> int:
    """Bytes alive per token at the peak of backward, for one micro-batch: what autograd saved
    in the forward plus the loss head's gradients (which is when backward peaks).

    Per block, with d = d_model, f = d_ff, a = 4 (fp32) or 2 (bf16/fp16 autocast):
    - residual stream: the two sums x + attn and x + mlp, fp32 (the residual stays fp32
      because the embedding is fp32): 8d
    - each RMSNorm: rsqrt (4), the normalized fp32 x (4d), and its output as saved by the
      linear layers that read it: 4d in fp32; under autocast each consumer saves its own
      half copy (3 x 2d for q/k/v, 2 x 2d for gate/up)
    - attention through the fused kernel (CPU flash, CUDA flash/efficient): q, k, v after
      rotary, the output and the logsumexp: a(2d + 2 d_kv) + 4 n_head; k and v count as d
      wide under GQA, because repeat_interleave copies them before attention
    - SwiGLU: gate, silu(gate), up and their product, a each: 4af
    - dropout > 0: the residual dropouts' masks (input dtype on CPU, bool on CUDA), and on
      CPU attention falls back to the math kernel, which runs in fp32 even under autocast and
      saves scaled q, k, v (4(d + 2 d_kv)), the (T x T) probabilities, dropout mask and dropped
      probabilities per head (12 n_head T) and a copy of its output for o_proj (ad).
    Outside the blocks: the embedding output (4d), the final norm (4 + 4d + its output),
    rotary cos/sin tables (2 x 4 head_size), token ids and targets (16). At the loss head
    backward holds the logits (aV, kept by the training loop), cross-entropy's saved fp32
    log-softmax, its incoming gradient and its outgoing one (12V) -- unless a block's backward
    workspace is larger: in the MLP, the product's gradient alive with those of silu(gate)
    and up (their saved inputs not yet freed; the product itself is) is 2af, plus two
    residual-wide fp32 gradients, 8d.
    """
    half = precision != "fp32"
    a = 2 if half else 4
    d, f, V, T = s.d_model, s.d_ff, s.vocab_size, s.context_length
    d_kv = d if s.n_kv_head < s.n_head else s.d_kv

    def norm(consumers: int) -> int:
        out = consumers * 2 * d if half else 4 * d
        return 4 + 4 * d + out

    if s.dropout > 0 and device_type == "cpu":
        # Math kernel, fp32: q, k, v; probabilities, mask, dropped probabilities; output copy.
        attention = 4 * (d + 2 * d_kv) + 12 * s.n_head * T + a * d
    else:
        attention = a * (2 * d + 2 * d_kv) + 4 * s.n_head  # q, k, v, output; fp32 logsumexp
    dropout_masks = 0
    if s.dropout > 0:
        dropout_masks = 2 * d * (1 if device_type == "cuda" else a)
    layer = 8 * d + norm(3) + attention + norm(2) + 4 * a * f + dropout_masks

    outside = 4 * d + norm(1) + 2 * 4 * s.head_size + 16
    head_backward = max(12 * V, 2 * a * f + 8 * d)
    return s.n_layer * layer + outside + a * V + head_backward


@dataclass
class MemoryPlan:
    """Estimated bytes per device for one training step, and what the device has to give."""

    parameters: int  # unique parameters (a tied embedding once)
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # per micro-batch of `micro_batch_size` sequences, peak during backward
    peak_bytes: int  # estimated peak per device for a training step
    micro_batch_size: int
    device: str  # "cpu" or "cuda:N"
    device_free_bytes: int | None  # free memory of that device now
    budget_bytes: int | None  # what the plan must fit in: train.max_memory or the free memory
    optimizer: str = "adamw"
    precision: str = "fp32"
    processes: int = 1
    strategy: str = "ddp"
    weight_copies_bytes: int = 0  # half-precision copies autocast makes of the linear weights
    buffers_bytes: int = 0  # DDP's gradient buckets, or FSDP's gathered parameters and gradients
    transient_bytes: int = 0  # gradient sums and optimizer.step() temporaries, once activations are freed

    def fits(self) -> bool:
        """True if the estimated peak is within the budget; True when no budget is known."""
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits()}

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a table, sizes in binary units."""
        sharded = " (sharded)" if self.strategy == "fsdp" and self.processes > 1 else ""
        rows = [
            ("parameters", f"{self.parameters:,}"),
            ("weights" + sharded, human_bytes(self.weights_bytes)),
            ("gradients" + sharded, human_bytes(self.gradients_bytes)),
            (f"optimizer state ({self.optimizer})" + sharded, human_bytes(self.optimizer_bytes)),
        ]
        if self.buffers_bytes:
            label = "DDP gradient buckets" if self.strategy == "ddp" else "FSDP gathered units"
            rows.append((label, human_bytes(self.buffers_bytes)))
        if self.weight_copies_bytes:
            rows.append((f"{self.precision} weight copies", human_bytes(self.weight_copies_bytes)))
        rows += [
            (f"activations (micro-batch {self.micro_batch_size})", human_bytes(self.activations_bytes)),
            ("estimated peak", human_bytes(self.peak_bytes)),
            (f"free on device ({self.device})", human_bytes(self.device_free_bytes)),
        ]
        if self.budget_bytes is not None and self.budget_bytes != self.device_free_bytes:
            rows.append(("budget", human_bytes(self.budget_bytes)))
        rows.append(("fits", "yes" if self.fits() else "no"))
        return rows


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise LlmctlError(f"{name}: unknown value {value!r}; choose one of {', '.join(allowed)}.")
    return value


def _device_type(device: str) -> str:
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise LlmctlError(f"device {device!r}: memory planning knows 'cpu' and 'cuda:N'.")
    return kind


def estimate_memory(
    model_config: GPTConfig | Mapping[str, Any],
    optimizer: str,
    precision: str,
    micro_batch_size: int,
    *,
    processes: int = 1,
    strategy: str = "ddp",
    device: str = "cpu",
    budget_bytes: int | None = None,
    momentum: float = 0.9,
) -> MemoryPlan:
    """Estimate the bytes one device needs for a training step of `micro_batch_size` sequences of the
    gpt model `model_config` describes (its GPTConfig, or a config.json dict read with its defaults).

    peak = weights + gradients + optimizer state + DDP/FSDP buffers
           + max(activations + autocast weight copies, temporaries after backward's activations are freed)
    With fsdp the weights, gradients and optimizer state are split over `processes`; with
    ddp each device holds them whole. `budget_bytes` defaults to the device's free memory.
    """
    return _estimate(
        model_config, optimizer, precision, micro_batch_size, processes=processes, strategy=strategy,
        device=device, budget_bytes=budget_bytes, momentum=momentum, free=free_device_memory(device),
    )


def _estimate(
    model_config: GPTConfig | Mapping[str, Any],
    optimizer: str,
    precision: str,
    micro_batch_size: int,
    *,
    processes: int,
    strategy: str,
    device: str,
    budget_bytes: int | None,
    momentum: float,
    free: int | None,
) -> MemoryPlan:
    s = _shape(model_config)
    _check_choice("train.optimizer", optimizer, OPTIMIZERS)
    if precision == "no":  # Accelerate's name for fp32
        precision = "fp32"
    _check_choice("train.precision", precision, PRECISIONS)
    _check_choice("strategy", strategy, STRATEGIES)
    kind = _device_type(device)
    if micro_batch_size < 1:
        raise LlmctlError(f"train.micro_batch_size: must be >= 1, got {micro_batch_size}.")
    if processes < 1:
        raise LlmctlError(f"processes: must be >= 1, got {processes}.")

    P = s.parameters
    shards = processes if strategy == "fsdp" else 1
    local = math.ceil(P / shards)
    weights = _FP32 * local
    gradients = _FP32 * local
    optimizer_state = optimizer_bytes_per_parameter(optimizer, momentum) * local

    buffers = 0
    if processes > 1 and strategy == "ddp":
        buffers = _FP32 * P  # the buckets hold a flat copy of every gradient for all-reduce
    elif processes > 1:
        # One unit (a block or the embedding) in use and the next prefetched, unsharded,
        # plus the unit's full gradient before its reduce-scatter.
        unit = max(s.layer_parameters, s.vocab_size * s.d_model)
        buffers = 3 * _FP32 * unit

    weight_copies = 0
    if precision != "fp32":
        # Autocast casts each linear weight (the tied head too) once per forward; the copies
        # stay saved for backward.
        weight_copies = 2 * (s.n_layer * s.layer_matrices + s.vocab_size * s.d_model)

    # Once activations are freed two things still allocate. At the end of backward a tied
    # embedding's gradient arrives twice (lookup and output head) and autograd sums the two
    # before adding them into .grad: three V x d tensors (one, untied). And optimizer.step():
    # on CUDA the optimizers run foreach kernels, which make one parameter-sized temporary
    # (sqrt of the second moment, or the weight-decayed gradient); on CPU they loop per
    # tensor, two temporaries of the largest tensor at a time.
    embedding = s.vocab_size * s.d_model
    backward_tail = _FP32 * embedding * (3 if s.tie_embeddings else 1)
    step_tmp = _FP32 * local if kind == "cuda" else 2 * _FP32 * s.largest_tensor
    transient = max(backward_tail, step_tmp)

    tokens = micro_batch_size * s.context_length
    activations = tokens * _activation_bytes_per_token(s, precision, kind)
    peak = weights + gradients + optimizer_state + buffers + max(activations + weight_copies, transient)

    return MemoryPlan(
        parameters=P,
        weights_bytes=weights,
        gradients_bytes=gradients,
        optimizer_bytes=optimizer_state,
        activations_bytes=activations,
        peak_bytes=peak,
        micro_batch_size=micro_batch_size,
        device=device,
        device_free_bytes=free,
        budget_bytes=budget_bytes if budget_bytes is not None else free,
        optimizer=optimizer,
        precision=precision,
        processes=processes,
        strategy=strategy,
        weight_copies_bytes=weight_copies,
        buffers_bytes=buffers,
        transient_bytes=transient,
    )


def choose_micro_batch(
    model_config: GPTConfig | Mapping[str, Any],
    optimizer: str,
    precision: str,
    batch_size: int,
    processes: int,
    budget_bytes: int,
    *,
    strategy: str = "ddp",
    device: str = "cpu",
    safety: float = 0.9,
    momentum: float = 0.9,
) -> int:
    """The largest micro-batch (sequences per process per forward) that divides the batch
    evenly over `processes` and whose estimated peak is within `safety` x `budget_bytes`."""
    if batch_size < 1 or processes < 1:
        raise LlmctlError(f"train.batch_size ({batch_size}) and processes ({processes}) must be >= 1.")
    if batch_size % processes:
        raise LlmctlError(
            f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({processes})."
        )
    if not 0 < safety <= 1:
        raise LlmctlError(f"safety: must be in (0, 1], got {safety}.")
    limit = safety * budget_bytes
    per_process = batch_size // processes
    free = free_device_memory(device)
    plan = None
    for m in sorted((m for m in range(1, per_process + 1) if per_process % m == 0), reverse=True):
        plan = _estimate(
            model_config, optimizer, precision, m, processes=processes, strategy=strategy, device=device,
            budget_bytes=budget_bytes, momentum=momentum, free=free,
        )
        if plan.peak_bytes <= limit:
            return m
    assert plan is not None
    raise LlmctlError(
        f"even micro_batch_size 1 needs an estimated {human_bytes(plan.peak_bytes)} on {device} "
        f"(weights {human_bytes(plan.weights_bytes)}, gradients {human_bytes(plan.gradients_bytes)}, "
        f"{optimizer} state {human_bytes(plan.optimizer_bytes)}, activations {human_bytes(plan.activations_bytes)}), "
        f"more than {safety:g} x the budget of {human_bytes(budget_bytes)} = {human_bytes(int(limit))}; "
        "shrink the model (model.n_layer, model.d_model, model.context_length), use fsdp over more processes, "
        "or raise train.max_memory.",
        kind="memory",
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """Room left under this process's cgroup memory limit, if it has one (v2, then v1)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2^63 for no limit
            return max(0, limit - usage)
    return None


def free_device_memory(device: str) -> int | None:
    """Bytes free on `device` now: MemAvailable (capped by a cgroup limit) for "cpu",
    cudaMemGetInfo for "cuda[:N]"; None where it cannot be known."""
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        free = None
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
        cgroup = _cgroup_free()
        if free is None:
            return cgroup
        return free if cgroup is None else min(free, cgroup)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    return None
