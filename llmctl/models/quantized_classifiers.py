"""Quantized sequence classifiers at run time: the recurrent int8 module, and how to rebuild a model from a model dir.

A classifier model dir written by `llmctl compress --quantize int8` has config.json
`"quantization": {"scheme": "int8", "weights": "int8-per-row"}` and stores every weight matrix
as int8 with one float32 scale per row (symmetric, weight = q * scale, rounded to nearest as the
`gpt` models' int8 scheme), under the float model's names with `_scale` appended for the scale.
Biases and norm weights stay float32. model.safetensors holds, for rnn / lstm / gru:

    embed.weight                       int8 (V, E)       embed.weight_scale                    float32 (V,)
    rnn.weight_ih_l{k}[_reverse]       int8 (G*H, In)    rnn.weight_ih_l{k}[_reverse]_scale    float32 (G*H,)
    rnn.weight_hh_l{k}[_reverse]       int8 (G*H, H)     rnn.weight_hh_l{k}[_reverse]_scale    float32 (G*H,)
    rnn.bias_ih_l{k}[_reverse], rnn.bias_hh_l{k}[_reverse]   float32 (G*H,)
    head.weight                        int8 (n_out, D*H) head.weight_scale                     float32 (n_out,)
    head.bias                          float32 (n_out,)

(G = 1 rnn, 4 lstm, 3 gru; In = E for layer 0, else D*H), and for gpt: `model.embed_tokens.weight`,
every decoder Linear `model.layers.{i}.*_proj.weight` and `score.weight`, each int8 with its
`.weight_scale`, plus the float32 norms, exactly as a quantized `gpt` language model stores them.

What computes in int8 and what only stores int8:

- lstm, gru: the recurrent layers run torch's dynamic int8 LSTM/GRU (`torch.quantized_lstm` /
  `torch.quantized_gru` over fbgemm's int8 GEMMs: each call quantizes its input to 8 bits per
  tensor, multiplies by the int8 weights and accumulates in int32; gates and cell state in float32).
  The head is int8 the same way (`quantized::linear_dynamic`).
- rnn: only the head computes in int8. torch has no int8 kernel for the tanh RNN, so its recurrent
  weights are stored int8 but dequantized to float32 at load, and the recurrence runs in float32.
- gpt: every decoder Linear and the `score` head compute in int8 (as the gpt "int8" scheme);
  attention, softmax, rotary and norms in float32.
- the token embedding (every family) is stored int8 and stays int8 in memory; looking a row up
  dequantizes it (no int8 arithmetic).

Activations are quantized with one scale per call, so a row's logits depend a little on the rows
batched with it (`model.batch_invariant` is False). Quantized classifiers run on CPU only, and only
the recurrent classifiers' packed-sequence path: the padded path that tracing takes needs the float
model, which `llmctl.compression.classifier_quant.dequantize_classifier` gives back (the exporter does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from llmctl.models.quantized import (
    DynamicInt8Linear,
    Int8Embedding,
    activations_need_reduced_range,
    check_tensor,
    aligned,
    decoder_linear_names,
    per_row_qint8,
)

SCHEME = "int8"
WEIGHTS = "int8-per-row"  # config.json's quantization.weights: the layout above
SCALE_SUFFIX = "_scale"
RECURRENT = ("rnn", "lstm", "gru")


def quantization_entry() -> dict[str, str]:
    """config.json's "quantization" entry of a quantized classifier."""
    return {"scheme": SCHEME, "weights": WEIGHTS}


def int8_compute(family: str) -> dict[str, list[str]]:
    """What of a quantized classifier of `family` computes in int8, and what is only stored int8 (see above)."""
    if family in ("lstm", "gru"):
        return {"int8_compute": [f"rnn ({family} layers, torch dynamic int8)", "head"], "int8_storage_only": ["embed"]}
    if family == "rnn":
        return {"int8_compute": ["head"], "int8_storage_only": ["embed", "rnn (dequantized to float32 at load)"]}
    return {"int8_compute": ["model.layers.* Linear layers", "score"], "int8_storage_only": ["model.embed_tokens"]}


def recurrent_names(n_layer: int, bidirectional: bool) -> list[str]:
    """The per layer and direction suffixes of nn.RNN's tensors: l0, l0_reverse, l1, ..."""
    return [f"l{k}{sfx}" for k in range(n_layer) for sfx in (("", "_reverse") if bidirectional else ("",))]


class Int8Recurrent(nn.Module):
    """nn.RNN / nn.LSTM / nn.GRU (batch_first, with biases, no initial state) on int8 weights per row.

    Holds the stored tensors as buffers under nn.RNN's names (so its state dict is the layout of
    model.safetensors). lstm and gru run torch's dynamic int8 LSTM/GRU on fbgemm's packed weights,
    made once here and kept out of the state dict; rnn runs `torch.rnn_tanh` on float32 weights
    dequantized here. Takes a PackedSequence or a (B, T, In) tensor and returns (output, h_n),
    h_n being (h_n, c_n) for lstm, like the torch module it replaces.
    """

    def __init__(self, mode: str, hidden_size: int, n_layer: int, bidirectional: bool, tensors: dict[str, torch.Tensor]):
        super().__init__()
        if mode not in RECURRENT:
            raise ValueError(f"mode must be one of {', '.join(RECURRENT)}, got {mode!r}")
        self.mode, self.hidden_size, self.num_layers, self.bidirectional = mode, hidden_size, n_layer, bidirectional
        self.directions = 2 if bidirectional else 1
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self._params: list[Any] = []  # per layer and direction: cell params (lstm, gru) or 4 float tensors (rnn)
        reduce_range = activations_need_reduced_range()
        for part in recurrent_names(n_layer, bidirectional):
            w_ih, w_hh = tensors[f"weight_ih_{part}"], tensors[f"weight_hh_{part}"]
            s_ih, s_hh = tensors[f"weight_ih_{part}{SCALE_SUFFIX}"], tensors[f"weight_hh_{part}{SCALE_SUFFIX}"]
            b_ih, b_hh = tensors[f"bias_ih_{part}"], tensors[f"bias_hh_{part}"]
            if mode == "rnn":
                self._params += [w_ih.float() * s_ih[:, None], w_hh.float() * s_hh[:, None], b_ih, b_hh]
            else:
                packed_ih = torch.ops.quantized.linear_prepack(per_row_qint8(w_ih, s_ih), b_ih)
                packed_hh = torch.ops.quantized.linear_prepack(per_row_qint8(w_hh, s_hh), b_hh)
                self._params.append(torch.ops.quantized.make_quantized_cell_params_dynamic(
                    packed_ih, packed_hh, b_ih, b_hh, reduce_range))

    def forward(self, x: PackedSequence | torch.Tensor) -> tuple[PackedSequence | torch.Tensor, Any]:
        packed = isinstance(x, PackedSequence)
        data = x.data if packed else x  # (N, In) packed, else (B, T, In)
        B = int(x.batch_sizes[0]) if packed else x.shape[0]
        h0 = data.new_zeros(self.num_layers * self.directions, B, self.hidden_size)  # (L*D, B, H)
        L, bi = self.num_layers, self.bidirectional
        # Packed: (data, batch_sizes, hx, ...); padded: (input, hx, ..., batch_first=True).
        head = (data, x.batch_sizes) if packed else (data,)
        tail = () if packed else (True,)
        if self.mode == "lstm":
            out = torch.quantized_lstm(*head, (h0, h0), self._params, True, L, 0.0, False, bi, *tail,
                                       dtype=torch.qint8, use_dynamic=True)
            y, hidden = out[0], (out[1], out[2])
        elif self.mode == "gru":
            y, hidden = torch.quantized_gru(*head, h0, self._params, True, L, 0.0, False, bi, *tail)
        else:
            y, hidden = torch.rnn_tanh(*head, h0, self._params, True, L, 0.0, False, bi, *tail)
        if not packed:
            return y, hidden
        # The packed kernels see the batch sorted by length; put the final states back in batch order.
        order = x.unsorted_indices
        if order is not None:
            if isinstance(hidden, tuple):
                hidden = tuple(h.index_select(1, order) for h in hidden)
            else:
                hidden = hidden.index_select(1, order)
        return PackedSequence(y, x.batch_sizes, x.sorted_indices, x.unsorted_indices), hidden


def build_quantized_classifier(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a quantized classifier from its config.json dict and model.safetensors tensors.

    The float skeleton is built on the meta device, its embedding, recurrent layers / decoder
    Linears and head swapped for int8 modules made from `tensors`, and the float tensors left
    (norms) assigned. Raises ValueError naming the first tensor that is missing, extra, or of the
    wrong dtype or shape, or a scheme other than int8.
    """
    quantization = config.get("quantization")
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    if scheme != SCHEME:
        raise ValueError(f"quantization scheme {scheme!r}: classifiers are quantized with {SCHEME} only")
    tensors = {name: aligned(t) for name, t in tensors.items()}
    family = config.get("family")
    if family in RECURRENT:
        model = _recurrent_classifier(config, tensors)
    elif family == "gpt":
        model = _gpt_classifier(config, tensors)
    else:
        raise ValueError(f"family {family!r} is not a classifier family ({', '.join((*RECURRENT, 'gpt'))})")
    model.quantization = dict(quantization)
    model.batch_invariant = False  # activations get one scale per call: a row's result depends on its batch
    return model.eval()


def _recurrent_classifier(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    from llmctl.models.classifiers import RNNClassifier, RNNConfig, num_outputs

    cfg = RNNConfig.from_dict(config)
    with torch.device("meta"):
        model = RNNClassifier(cfg)
    H, D = cfg.hidden_size, cfg.directions
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.family] * H
    model.embed = Int8Embedding(*_int8_rows_from(tensors, "embed.weight", cfg.vocab_size, cfg.d_model))
    recurrent: dict[str, torch.Tensor] = {}
    for part in recurrent_names(cfg.n_layer, cfg.bidirectional):
        layer_in = cfg.d_model if part.split("_")[0] == "l0" else D * H
        for kind, cols in (("ih", layer_in), ("hh", H)):
            name = f"weight_{kind}_{part}"
            recurrent[name], recurrent[name + SCALE_SUFFIX] = _int8_rows_from(tensors, f"rnn.{name}", gates, cols)
            recurrent[f"bias_{kind}_{part}"] = _float_from(tensors, f"rnn.bias_{kind}_{part}", (gates,))
    model.rnn = Int8Recurrent(cfg.family, H, cfg.n_layer, cfg.bidirectional, recurrent)
    n_out = num_outputs(cfg.num_classes)
    weight, scale = _int8_rows_from(tensors, "head.weight", n_out, D * H)
    model.head = DynamicInt8Linear(weight, scale, _float_from(tensors, "head.bias", (n_out,)))
    if tensors:
        raise ValueError(f"unexpected tensors {sorted(tensors)[:3]}")
    return model


def _gpt_classifier(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    from llmctl.models.classifiers import GPTClassifier, GPTClassifierConfig, num_outputs

    cfg = GPTClassifierConfig.from_dict(config)
    with torch.device("meta"):
        model = GPTClassifier(cfg)
    for name in decoder_linear_names(model):
        linear = model.get_submodule(name)
        rows = _int8_rows_from(tensors, f"{name}.weight", linear.out_features, linear.in_features)
        model.set_submodule(name, DynamicInt8Linear(*rows))
    model.model.embed_tokens = Int8Embedding(*_int8_rows_from(tensors, "model.embed_tokens.weight", cfg.vocab_size, cfg.d_model))
    model.score = DynamicInt8Linear(*_int8_rows_from(tensors, "score.weight", num_outputs(cfg.num_classes), cfg.d_model))
    floats = dict(model.named_parameters())  # what is left: the norms
    unexpected = sorted(set(tensors) - set(floats))
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected[:3]}")
    model.load_state_dict({n: _float_from(tensors, n, tuple(floats[n].shape)) for n in list(tensors)}, strict=False, assign=True)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"missing tensors {missing[:3]}")
    return model


def dequantized_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict a quantized classifier's tensors stand for: each int8 `X` with its
    `X_scale` becomes X * scale per row; float tensors are kept. It loads into the float classifier."""
    state = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in tensors:
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        state[name] = t.float() * scale[:, None] if t.dtype == torch.int8 and scale is not None else t.detach().float()
    return state


def _int8_rows_from(tensors: dict, name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = check_tensor(name, tensors.pop(name, None), (rows, cols), torch.int8)
    scale = check_tensor(name + SCALE_SUFFIX, tensors.pop(name + SCALE_SUFFIX, None), (rows,), torch.float32)
    return weight, scale


def _float_from(tensors: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    return check_tensor(name, tensors.pop(name, None), shape, torch.float32)
