"""Sequence classifiers: families `rnn`, `lstm`, `gru`, and `gpt` (the decoder as a backbone) for `data.task: classification`.

Every classifier maps right-padded token ids (B, T) and their lengths (B,) to logits (B, n_out):
one logit when num_classes == 2 (sigmoid and binary cross-entropy, as the founding example's dense
sigmoid output), else one per class (softmax). Positions at or past a row's length are padding and
never reach the output.

The recurrent classifiers run packed sequences in eager mode. Packed sequences do not trace, so
while `torch.onnx.export` or `torch.export` traces the model (or when `packed_sequences` is False)
the same maths runs on the padded batch instead: the forward direction is read at position
length-1, and the backward direction runs on each row reversed within its own length, so padding
is never seen. Both paths agree to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmctl.models.gpt import GPT, rotary_cos_sin
from llmctl.models.shapes import POOLINGS, GPTClassifierConfig, RNNConfig

TASK = "classification"
CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def num_outputs(num_classes: int) -> int:
    """Logits per text: 1 for two classes (a sigmoid), else one per class."""
    return 1 if num_classes == 2 else num_classes


# --- the task's maths ------------------------------------------------------------------------------


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, num_classes) from logits (B, n_out); a single logit gives [1 - sigmoid, sigmoid]."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits)  # (B, 1)
        return torch.cat((1 - p, p), dim=-1)
    return logits.softmax(dim=-1)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Class ids (B,) from logits (B, n_out): the larger probability (a single logit: class 1 when > 0)."""
    if logits.shape[-1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=-1)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean loss over the batch: binary cross-entropy on a single logit, else cross-entropy.

    `class_weights` (num_classes,) weights each text by its label's weight; the mean is then taken
    over the weights (sum w_i * loss_i / sum w_i), as `F.cross_entropy` does, so binary and
    multi-class weighting agree and scaling every weight by one factor changes nothing.
    """
    logits = logits.float()
    weights = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    if logits.shape[-1] == 1:
        per_text = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")  # (B,)
        if weights is None:
            return per_text.mean()
        w = weights[labels]  # (B,)
        return (per_text * w).sum() / w.sum()
    return F.cross_entropy(logits, labels, weight=weights)


def pool(states: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row from per-position states (B, T, C) over the real positions (< length) -> (B, C)."""
    T = states.shape[1]
    if pooling == "last":
        return _at(states, lengths - 1)
    real = (torch.arange(T, device=states.device)[None, :] < lengths[:, None])[..., None]  # (B, T, 1)
    if pooling == "mean":
        return states.masked_fill(~real, 0.0).sum(dim=1) / lengths[:, None].to(states.dtype)
    if pooling == "max":
        return states.masked_fill(~real, float("-inf")).amax(dim=1)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def _at(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states (B, T, C) at one position per row, index (B,) -> (B, C)."""
    return states.gather(1, index[:, None, None].expand(-1, 1, states.shape[2])).squeeze(1)


def _tracing() -> bool:
    """True while torch.onnx.export or torch.export traces the model."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _clamped(lengths: torch.Tensor, T: int) -> torch.Tensor:
    # An empty row would have nothing to pool (and packing refuses it): it reads its first position.
    return lengths.to(torch.int64).clamp(min=1, max=T)


# --- rnn, lstm, gru --------------------------------------------------------------------------------


class RNNClassifier(nn.Module):
    """Embedding -> dropout -> recurrent layers -> pooling -> dropout -> linear head."""

    task = TASK

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rnn = CELLS[cfg.family](
            cfg.d_model, cfg.hidden_size, num_layers=cfg.n_layer, batch_first=True,
            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.directions * cfg.hidden_size, num_outputs(cfg.num_classes))
        # False runs the padded path in eager mode too (it is chosen anyway while a tracer runs).
        self.packed_sequences = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_out) for right-padded token ids (B, T) with real lengths (B,) in [1, T]."""
        B, T = input_ids.shape
        lengths = _clamped(lengths, T)
        x = self.dropout(self.embed(input_ids))  # (B, T, E)
        if self.packed_sequences and not _tracing():
            states, last = self._packed(x, lengths)
        else:
            states, last = self._padded(x, lengths)
        pooled = last if self.config.pooling == "last" else pool(states, lengths, self.config.pooling)  # (B, D*H)
        return self.head(self.dropout(pooled))  # (B, n_out)

    def _packed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Last layer's states (B, T, D*H), zero past each length (None for pooling last); final states (B, D*H)."""
        B, T, _ = x.shape
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden  # (L*D, B, H); lstm's is (h, c)
        D = self.config.directions
        last = h_n[-D:].transpose(0, 1).reshape(B, -1)  # (B, D*H): forward then backward
        states = None
        if self.config.pooling != "last":
            states, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, D*H)
        return states, last

    def _padded(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed path's results from the padded batch, one layer and direction at a time."""
        T, H = x.shape[1], self.config.hidden_size
        positions = torch.arange(T, device=x.device)[None, :]  # (1, T)
        # Row b reversed within its length: position t < L reads L-1-t; padding stays where it is.
        flip = torch.where(positions < lengths[:, None], lengths[:, None] - 1 - positions, positions)  # (B, T)
        for layer in range(self.config.n_layer):
            if layer:
                x = F.dropout(x, self.rnn.dropout, self.training)
            outs = [self._direction(x, layer, "")]  # (B, T, H)
            if self.config.bidirectional:
                backward = self._direction(_gather_time(x, flip), layer, "_reverse")
                outs.append(_gather_time(backward, flip))  # back in reading order
            x = torch.cat(outs, dim=-1)  # (B, T, D*H)
        last = _at(x[..., :H], lengths - 1)  # (B, H): forward state after the last real token
        if self.config.bidirectional:
            last = torch.cat((last, x[:, 0, H:]), dim=-1)  # (B, 2H): backward state after the first token
        return x, last

    def _direction(self, x: torch.Tensor, layer: int, suffix: str) -> torch.Tensor:
        """One layer, one direction of `self.rnn` reading x (B, T, In) left to right -> outputs (B, T, H)."""
        w_ih, w_hh, b_ih, b_hh = (getattr(self.rnn, f"{name}_l{layer}{suffix}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        h0 = x.new_zeros(1, x.shape[0], self.config.hidden_size)  # (1, B, H)
        params = [w_ih, w_hh, b_ih, b_hh]
        # lstm and gru export as ONNX LSTM / GRU nodes with a dynamic sequence length. The exporter
        # unrolls the tanh RNN's op over the traced length instead, so while tracing it runs as a
        # scan (ONNX Scan). Eager scan runs through torch.compile, so eager keeps nn.RNN's own op.
        if self.config.family == "lstm":
            return torch.lstm(x, (h0, h0), params, True, 1, 0.0, self.training, False, True)[0]
        if self.config.family == "gru":
            return torch.gru(x, h0, params, True, 1, 0.0, self.training, False, True)[0]
        if _tracing():
            return _tanh_scan(x, h0[0], *params)
        return torch.rnn_tanh(x, h0, params, True, 1, 0.0, self.training, False, True)[0]


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) reordered along time by index (B, T) -> (B, T, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def _tanh_scan(x, h0, w_ih, w_hh, b_ih, b_hh) -> torch.Tensor:
    """nn.RNN's tanh recurrence h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) as a scan over time."""
    from torch._higher_order_ops.scan import scan

    inputs = F.linear(x, w_ih, b_ih)  # (B, T, H)
    # On CUDA the RNN's weights are views of one flat buffer, and scan refuses aliased closure inputs.
    w_hh, b_hh = w_hh.clone(), b_hh.clone()

    def step(h: torch.Tensor, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(inp + F.linear(h, w_hh, b_hh))  # (B, H)
        return h, h.clone()  # scan's outputs may not alias its carry

    _, out = scan(step, h0, inputs, dim=1)
    return out  # (B, T, H)


def build_rnn_classifier(config: dict[str, Any]) -> RNNClassifier:
    return RNNClassifier(RNNConfig.from_dict(config))


# --- gpt backbone ----------------------------------------------------------------------------------


class GPTClassifier(nn.Module):
    """The `gpt` decoder body (`model.*`, the same names as a `gpt` model dir) with a pooled linear head `score`."""

    task = TASK

    def __init__(self, cfg: GPTClassifierConfig):
        super().__init__()
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.model = GPT(cfg).model  # the decoder's blocks and init; its lm_head is dropped
        self.dropout = nn.Dropout(cfg.dropout)
        self.score = nn.Linear(cfg.d_model, num_outputs(cfg.num_classes), bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=cfg.init_std)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_out) for right-padded token ids (B, T) with real lengths (B,) in [1, T]."""
        B, T = input_ids.shape
        lengths = _clamped(lengths, T)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        cos, sin = rotary_cos_sin(positions, self.config.head_size, self.config.rope_theta)
        mask = None  # eager: SDPA's is_causal (flash kernels); causal either way, so no real position sees padding
        if _tracing():
            # The decoder picks is_causal by `T > 1`, a Python branch on a traced size: give the mask instead.
            key = torch.arange(T, device=input_ids.device)  # (T,)
            mask = (key[None, :] <= key[:, None])[None, None]  # (1, 1, T, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.model.layers:
            x, _ = layer(x, cos, sin, None, mask)
        x = self.model.norm(x)  # (B, T, C)
        return self.score(self.dropout(pool(x, lengths, self.config.pooling)))  # (B, n_out)


def build_gpt_classifier(config: dict[str, Any]) -> GPTClassifier:
    return GPTClassifier(GPTClassifierConfig.from_dict(config))
