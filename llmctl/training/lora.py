"""LoRA (Hu et al., 2021): train low-rank adapters on a frozen `gpt` model, then merge them into its weights.

`train.lora` turns each target nn.Linear into a `LoRALinear`: the same frozen weight plus a trainable
update, y = x W^T + (alpha / rank) * B A dropout(x), with A (rank, in) initialised like an nn.Linear
weight (Kaiming-uniform) and B (out, rank) zero, so training starts exactly at the base model. Every
other parameter is frozen, so the optimizer (which skips frozen parameters) holds state for the
adapters alone, and checkpoints store the adapters alone (checkpoints.py): the base weights come back
from model.init_from (or the seed) on resume.

The trained model dir holds the merged weights W + (alpha / rank) B A, an ordinary `gpt` model dir
with an `adapter` record in llmctl.json, so every consumer (eval, compress, export, serve, a later
init_from) reads it as it reads any other, with no flag and no second file to find.

Our own ~100 lines rather than `peft`: our model is one file of plain nn.Linear layers, so an adapter
layer, freezing and merging are all there is to it. peft would bring transformers (seconds of import,
a large dependency) into every training run, wrap the model in a PeftModel whose parameter names
(`base_model.model.<name>.base_layer.weight`) then run through Accelerate's wrappers and our
checkpoints, and we would still merge before writing a model dir.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmctl.errors import LlmctlError

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key names an adapter tensor (whatever wrapper prefix it has)."""
    return name.endswith(ADAPTER_SUFFIXES)


class LoRALinear(nn.Linear):
    """An nn.Linear (sharing the base layer's frozen weight and bias) plus a trainable low-rank update.

    It stays an nn.Linear with the same `weight`, so the base weights keep their state-dict names.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A, shape (out, in)."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the model's nn.Linear layers, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _short_names(names: list[str]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The linear layers `targets` name (each a layer name or a dotted suffix of one, e.g. q_proj or
    layers.0.self_attn.q_proj); a target that matches none is an LlmctlError listing those that exist."""
    names = linear_layer_names(model)
    chosen: dict[str, None] = {}
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            short = _short_names(names)
            close = difflib.get_close_matches(target.rsplit(".", 1)[-1], short, n=1)
            hint = f"; did you mean {close[0]}?" if close else "."
            raise LlmctlError(
                f"train.lora.targets: {target!r} matches no linear layer of this model{hint} Its linear layers are "
                f"{', '.join(short)} (a target is one of those names, or a dotted suffix of a full name such as "
                f"{names[0] if names else 'model.layers.0.self_attn.q_proj'})."
            )
        chosen.update(dict.fromkeys(hits))
    return [n for n in names if n in chosen]


def apply_lora(model: nn.Module, lora: Any) -> list[str]:
    """Freeze `model` and put adapters on the layers `lora.targets` names (a LoraConfig); returns their names.

    The output head of a model with tied embeddings is refused: it shares its weight with the token
    embedding, so a merged update would change the embedding too.
    """
    chosen = match_targets(model, lora.targets)
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False):
        tied = [n for n in chosen if n.rsplit(".", 1)[-1] == "lm_head"]
        if tied:
            raise LlmctlError(
                "train.lora.targets: lm_head shares its weight with the token embedding (model.tie_embeddings: true), "
                "so its adapter could not be merged; target the attention and MLP layers (q_proj, v_proj, ...)."
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, LoRALinear(getattr(holder, attr), lora.rank, lora.alpha, lora.dropout))
    return chosen


def adapter_parameters(model: nn.Module) -> int:
    """Number of trainable adapter values in `model`."""
    return sum(p.numel() for name, p in model.named_parameters() if is_adapter_key(name))


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model `model` stands for: each adapted weight replaced by W + scale B A,
    the adapter tensors left out. The model itself is not changed."""
    merged = {f"{name}.weight": m.merged_weight() for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {k: merged.get(k, v).detach() for k, v in model.state_dict().items() if not is_adapter_key(k)}


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the (frozen) base weights: every tensor's name, shape and up to 4,096 evenly
    spaced values. A resumed LoRA run checks it, so its adapters never continue on other base weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if is_adapter_key(name):
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def adapter_record(lora: Any, layers: list[str], trainable: int, total: int, base: str | None) -> dict[str, Any]:
    """What llmctl.json says about the adapters merged into a model dir's weights."""
    return {
        "method": "lora",
        "merged": True,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": list(lora.targets),
        "layers": len(layers),
        "trainable_parameters": trainable,
        "base_parameters": total,
        "base": base,
    }
