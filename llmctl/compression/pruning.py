"""Pruning: magnitude zeros in a model's weight matrices, or whole heads and MLP channels of a `gpt` model removed.

`prune_unstructured` zeroes the smallest weights in place (the file keeps its shapes; the zeros pay
off once compressed or run by a sparse kernel): the decoder Linear layers of a `gpt` model (language
model or classifier), the recurrent weight matrices of an rnn/lstm/gru classifier. `prune_structured`
returns a new, genuinely smaller dense `gpt` language model that saves and loads as a plain `gpt`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from llmctl.errors import LlmctlError
from llmctl.models.gpt import GPT, GPTConfig

SCOPES = ("global", "layer")
_CALIBRATION_ROWS_PER_FORWARD = 8  # sequences per calibration forward, to bound activation memory


def prune_unstructured(model: nn.Module, sparsity: float, scope: str = "global") -> dict:
    """Zero the `sparsity` share of smallest-magnitude weights of the model's prunable matrices, in place.

    Those are the decoder Linear layers of a `gpt` model or classifier, and the recurrent
    weight_ih / weight_hh matrices of an rnn, lstm or gru classifier (`prune_targets`). `scope`
    "global" ranks all those weights together (matrices end up unequally sparse); "layer" gives
    each matrix the same sparsity. Embeddings, output heads, biases and norms are left alone.
    Returns {"scope", "target_sparsity", "pruned_weights", "prunable_weights"} (counts of weights).
    """
    targets = prune_targets(model)
    if scope not in SCOPES:
        raise LlmctlError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}.")
    if not 0.0 <= sparsity < 1.0:
        raise LlmctlError(f"pruning sparsity must be in [0, 1), got {sparsity}.")
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for m, name in targets:
            prune.l1_unstructured(m, name, amount=sparsity)
    pruned = sum(int((getattr(m, f"{name}_mask") == 0).sum()) for m, name in targets)
    for m, name in targets:
        prune.remove(m, name)  # the masked weight becomes the plain parameter again
    return {
        "scope": scope,
        "target_sparsity": sparsity,
        "pruned_weights": pruned,
        "prunable_weights": sum(getattr(m, name).numel() for m, name in targets),
    }


def prune_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every matrix `prune_unstructured` prunes in `model`.

    The decoder Linear layers of a `gpt` language model or classifier; the recurrent weight_ih_l* /
    weight_hh_l* of an rnn, lstm or gru classifier (torch's pruning reparametrizes them in place,
    and nn.RNN's flat weights follow). Refuses a quantized model and any other kind of model.
    """
    from llmctl.models.classifiers import GPTClassifier, RNNClassifier

    if getattr(model, "quantization", None):
        raise LlmctlError("cannot prune a quantized model; prune the float model first, then quantize.")
    if isinstance(model, (GPT, GPTClassifier)):
        return [(m, "weight") for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    if isinstance(model, RNNClassifier):
        return [(model.rnn, name) for name in model.rnn._flat_weights_names if name.startswith("weight_")]
    raise LlmctlError(f"can only prune `gpt` models and rnn/lstm/gru/gpt classifiers, not {type(model).__name__}.")


def prune_structured(model: GPT, fraction: float, calibration: torch.Tensor | None = None) -> GPT:
    """A new smaller `GPT` with `fraction` of each layer's KV head groups and MLP channels removed.

    Every layer loses the same number of head groups (a KV head with the query heads sharing it) and
    of MLP channels, each rounded to nearest and at least one of each kept; which ones go is decided
    per layer by importance. With `calibration` token ids (B, T) the importance is measured on
    activations (the mean norm of a group's contribution to the attention output; for a channel,
    mean |silu(gate) * up| times the norm of its down_proj column), else on weight magnitudes.
    `model` itself is left unchanged.
    """
    _check_float_gpt(model)
    if not 0.0 <= fraction < 1.0:
        raise LlmctlError(f"structured pruning fraction must be in [0, 1), got {fraction}.")
    cfg = model.config
    n_groups, group = cfg.n_kv_head, cfg.n_head // cfg.n_kv_head
    drop_groups = min(math.floor(fraction * n_groups + 0.5), n_groups - 1)
    drop_channels = min(math.floor(fraction * cfg.d_ff + 0.5), cfg.d_ff - 1)
    if calibration is None:
        head_scores, channel_scores = _weight_scores(model)
    else:
        head_scores, channel_scores = _activation_scores(model, _check_calibration(calibration, cfg))
    keep_groups = [_top(s, n_groups - drop_groups) for s in head_scores]
    keep_channels = [_top(s, cfg.d_ff - drop_channels) for s in channel_scores]

    hs = cfg.head_size
    small_cfg = dataclasses.replace(
        cfg, n_head=(n_groups - drop_groups) * group, n_kv_head=n_groups - drop_groups, head_dim=hs,
        d_ff=cfg.d_ff - drop_channels,
    )
    state = model.state_dict()  # the untouched tensors: embeddings, norms, head
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        kv_rows = _head_rows(keep_groups[i], hs)  # rows of k_proj / v_proj to keep
        q_heads = (keep_groups[i][:, None] * group + torch.arange(group)).flatten()  # query heads of kept groups
        q_rows = _head_rows(q_heads, hs)
        c = keep_channels[i]
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = attn.q_proj.weight.detach()[q_rows]
        state[p + "self_attn.k_proj.weight"] = attn.k_proj.weight.detach()[kv_rows]
        state[p + "self_attn.v_proj.weight"] = attn.v_proj.weight.detach()[kv_rows]
        state[p + "self_attn.o_proj.weight"] = attn.o_proj.weight.detach()[:, q_rows]
        state[p + "mlp.gate_proj.weight"] = mlp.gate_proj.weight.detach()[c]
        state[p + "mlp.up_proj.weight"] = mlp.up_proj.weight.detach()[c]
        state[p + "mlp.down_proj.weight"] = mlp.down_proj.weight.detach()[:, c]
    weight = model.model.embed_tokens.weight
    small = GPT(small_cfg).to(device=weight.device, dtype=weight.dtype)
    small.load_state_dict(state)
    return small.train(model.training)


def sparsity(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of `model`, a tied weight counted once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def _weight_scores(model: GPT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: a score per KV group (||v_proj rows|| * ||o_proj columns of its query heads||) and per
    MLP channel (||gate row|| * ||up row|| * ||down column||)."""
    cfg = model.config
    n_groups = cfg.n_kv_head
    heads, channels = [], []
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            v = attn.v_proj.weight.float().view(n_groups, -1).norm(dim=1)  # (G,)
            o = attn.o_proj.weight.float().view(cfg.d_model, n_groups, -1).norm(dim=(0, 2))  # (G,)
            heads.append(v * o)
            channels.append(
                mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)
                * mlp.down_proj.weight.float().norm(dim=0)
            )  # (d_ff,)
    return heads, channels


def _activation_scores(model: GPT, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, from a forward over `calibration`: a score per KV group (mean over tokens of the norm of
    its query heads' summed contribution to o_proj's output) and per MLP channel (mean |silu(gate) * up|
    times the norm of its down_proj column)."""
    cfg = model.config
    n_layer, n_groups = cfg.n_layer, cfg.n_kv_head
    head_sums = [torch.zeros(n_groups) for _ in range(n_layer)]
    channel_sums = [torch.zeros(cfg.d_ff) for _ in range(n_layer)]
    tokens = 0

    def on_attention_output(i: int, o_proj: nn.Linear):
        def hook(_module, args):
            y = args[0].float()  # (B, T, nh*hs), the heads' outputs before o_proj
            B, T, _ = y.shape
            w = o_proj.weight.float().view(cfg.d_model, n_groups, -1)  # (C, G, group*hs)
            contribution = torch.einsum("btgk,cgk->btgc", y.view(B, T, n_groups, -1), w)  # (B, T, G, C)
            head_sums[i] += contribution.norm(dim=-1).sum(dim=(0, 1)).cpu()

        return hook

    def on_mlp_hidden(i: int):
        def hook(_module, args):
            channel_sums[i] += args[0].float().abs().sum(dim=(0, 1)).cpu()  # (d_ff,)

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_attention_output(i, layer.self_attn.o_proj)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp_hidden(i)))
    was_training = model.training
    model.eval()
    device = model.model.embed_tokens.weight.device
    try:
        with torch.no_grad():
            for rows in calibration.split(_CALIBRATION_ROWS_PER_FORWARD):
                model(rows.to(device))
                tokens += rows.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    heads = [s / tokens for s in head_sums]
    channels = [
        s / tokens * layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu()
        for s, layer in zip(channel_sums, model.model.layers)
    ]
    return heads, channels


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores, in ascending index order (keeps the heads' GQA pairing)."""
    return torch.topk(scores, k).indices.sort().values


def _head_rows(heads: torch.Tensor, head_size: int) -> torch.Tensor:
    """Weight rows of the given heads: head h owns rows h*hs .. (h+1)*hs - 1."""
    return (heads[:, None] * head_size + torch.arange(head_size)).flatten()


def _check_calibration(calibration: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise LlmctlError("calibration must be token ids, an integer tensor of shape (batch, tokens).")
    if calibration.numel() == 0:
        raise LlmctlError("calibration holds no tokens; give at least one sequence.")
    if calibration.shape[1] > cfg.context_length:
        raise LlmctlError(
            f"calibration sequences have {calibration.shape[1]} tokens, more than the model's context "
            f"length {cfg.context_length}; cut them."
        )
    if int(calibration.min()) < 0 or int(calibration.max()) >= cfg.vocab_size:
        raise LlmctlError(
            f"calibration token ids must be in [0, {cfg.vocab_size}); the tokens come from another tokenizer."
        )
    return calibration.long()


def _check_float_gpt(model: nn.Module) -> None:
    if not isinstance(model, GPT):
        raise LlmctlError(f"can only prune `gpt` models, not {type(model).__name__}.")
    if getattr(model, "quantization", None):
        raise LlmctlError("cannot prune a quantized model; prune the float model first, then quantize.")
