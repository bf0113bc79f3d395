"""Sequence classifiers: shapes, padding, packed vs padded paths, losses, learning, ONNX, quantization, model dirs."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import pytest
import torch
import torch.nn as nn

from llmctl.models import build_model
from llmctl.models.classifiers import (
    GPTClassifier,
    RNNClassifier,
    _tanh_scan,
    class_probabilities,
    classification_loss,
    predict,
)
from llmctl.models.gpt import GPT, GPTConfig
from llmctl.models.model_dir import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 300  # the tiny tokenizer's vocabulary (see conftest.tiny_tokenizer_path)
TINY = {
    "rnn": {"family": "rnn", "n_layer": 2, "d_model": 8, "hidden_size": 6},
    "lstm": {"family": "lstm", "n_layer": 2, "d_model": 8, "hidden_size": 6},
    "gru": {"family": "gru", "n_layer": 2, "d_model": 8, "hidden_size": 6},
    "gpt": {"family": "gpt", "n_layer": 2, "n_head": 2, "d_model": 16, "context_length": 32},
}
FAMILIES = list(TINY)
POOLINGS = ["last", "mean", "max"]


def classifier(family: str, seed: int = 0, **config: Any) -> Any:
    torch.manual_seed(seed)
    return build_model({"vocab_size": V, "num_classes": 3, "pad_id": 0, **TINY[family], **config}).eval()


def ragged_batch(B: int = 4, T: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) with pad id 0 and lengths (B,) that include 1 and T."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    lengths = torch.tensor([T, 1, *torch.randint(2, T, (B - 2,), generator=g).tolist()])
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def variants(recurrent_only: bool = False) -> list[Any]:
    """Every family with every pooling; the recurrent ones also bidirectional."""
    out = []
    for family in FAMILIES:
        if recurrent_only and family == "gpt":
            continue
        for pooling in POOLINGS:
            out.append(pytest.param(family, {"pooling": pooling}, id=f"{family}-{pooling}"))
            if family != "gpt":
                bi = {"pooling": pooling, "bidirectional": True}
                out.append(pytest.param(family, bi, id=f"{family}-{pooling}-bi"))
    return out


# --- shapes and config -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_classes, n_out", [(2, 1), (3, 3)], ids=["binary", "3-class"])
def test_logits_have_one_column_for_two_classes_else_one_per_class(family, num_classes, n_out):
    model = classifier(family, num_classes=num_classes)
    ids, lengths = ragged_batch(B=5)
    logits = model(ids, lengths)
    assert logits.shape == (5, n_out)
    assert class_probabilities(logits).shape == (5, num_classes)
    assert predict(logits).shape == (5,)
    assert model.task == "classification" and model.num_classes == num_classes


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_a_dict_naming_family_classes_and_pad_id(family):
    model = classifier(family, pad_id=7, labels=["neg", "neu", "pos"], n_head=2)
    d = model.config.to_dict()
    assert d["family"] == family and d["num_classes"] == 3 and d["vocab_size"] == V and d["pad_id"] == 7
    assert d["labels"] == ["neg", "neu", "pos"] and d["pooling"] == "last"
    assert type(model.config).from_dict({**d, "unrelated_key": 1}) == model.config
    assert isinstance(build_model(d), type(model))


def test_recurrent_hidden_size_defaults_to_d_model():
    model = classifier("gru", hidden_size=None, bidirectional=True)
    assert model.config.hidden_size == 8 and model.head.in_features == 16


def test_registry_builds_a_decoder_for_gpt_without_num_classes_and_a_classifier_with_it():
    base = {"family": "gpt", "vocab_size": V, **TINY["gpt"]}
    assert type(build_model(base)) is GPT
    assert type(build_model({**base, "num_classes": 2})) is GPTClassifier
    assert type(build_model({**TINY["lstm"], "vocab_size": V, "num_classes": 2})) is RNNClassifier


def test_bad_classifier_configs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="pooling must be one of last, mean, max"):
        classifier("lstm", pooling="first")
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        classifier("gpt", num_classes=1)
    with pytest.raises(TypeError, match="num_classes"):
        build_model({"family": "rnn", "vocab_size": V})


def test_gpt_classifier_backbone_has_the_decoders_parameter_names_without_lm_head():
    decoder = GPT(GPTConfig.from_dict({"vocab_size": V, **TINY["gpt"], "tie_embeddings": False}))
    model = classifier("gpt", tie_embeddings=False)
    backbone = {k: v for k, v in decoder.state_dict().items() if not k.startswith("lm_head.")}
    assert set(model.state_dict()) == set(backbone) | {"score.weight"}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert missing == ["score.weight"] and unexpected == []


# --- padding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, extra", variants())
def test_padding_ids_and_extra_padding_columns_leave_the_logits_unchanged(family, extra):
    model = classifier(family, **extra)
    ids, lengths = ragged_batch()
    with torch.no_grad():
        ref = model(ids, lengths)
        padding = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
        other_pads = ids.masked_scatter(padding, torch.randint(1, V, (int(padding.sum()),)))
        wider = torch.cat((ids, torch.randint(0, V, (ids.shape[0], 5))), dim=1)  # 5 more padding columns
        torch.testing.assert_close(model(other_pads, lengths), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(wider, lengths), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family, extra", variants(recurrent_only=True))
def test_packed_and_padded_paths_agree(family, extra):
    model = classifier(family, **extra)
    ids, lengths = ragged_batch(B=6, T=11, seed=3)
    with torch.no_grad():
        packed = model(ids, lengths)
        model.packed_sequences = False
        padded = model(ids, lengths)
    torch.testing.assert_close(padded, packed, rtol=0, atol=1e-5)


def test_the_traced_tanh_rnn_scan_computes_nn_rnns_recurrence():
    rnn = nn.RNN(5, 4, batch_first=True)
    x = torch.randn(3, 7, 5)
    with torch.no_grad():
        got = _tanh_scan(x, torch.zeros(3, 4), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        torch.testing.assert_close(got, rnn(x)[0], rtol=0, atol=1e-6)


def test_packed_and_padded_paths_have_the_same_gradients():
    model = classifier("lstm", bidirectional=True, pooling="mean").train()  # dropout 0: both paths deterministic
    ids, lengths = ragged_batch()
    labels = torch.tensor([0, 1, 2, 1])
    grads = []
    for packed in (True, False):
        model.zero_grad()
        model.packed_sequences = packed
        classification_loss(model(ids, lengths), labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)


# --- the task's maths ------------------------------------------------------------------------------


def test_binary_loss_is_binary_cross_entropy_on_the_single_logit_weighted_by_label():
    logits, labels = torch.tensor([[0.5], [-1.0], [2.0]]), torch.tensor([1, 0, 0])
    sig = [1 / (1 + math.exp(-z)) for z in (0.5, -1.0, 2.0)]
    per_text = [-math.log(sig[0]), -math.log(1 - sig[1]), -math.log(1 - sig[2])]
    assert classification_loss(logits, labels).item() == pytest.approx(sum(per_text) / 3, rel=1e-6)
    w = [0.25, 3.0]  # class 0, class 1
    weighted = (w[1] * per_text[0] + w[0] * per_text[1] + w[0] * per_text[2]) / (w[1] + w[0] + w[0])
    got = classification_loss(logits, labels, torch.tensor(w))
    assert got.item() == pytest.approx(weighted, rel=1e-6)


def test_multiclass_loss_is_cross_entropy_with_class_weights():
    logits, labels = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 2.0]]), torch.tensor([0, 1])

    def nll(row: list[float], k: int) -> float:
        return math.log(sum(math.exp(z) for z in row)) - row[k]

    per_text = [nll([1.0, 0.0, -1.0], 0), nll([0.2, 0.3, 2.0], 1)]
    assert classification_loss(logits, labels).item() == pytest.approx(sum(per_text) / 2, rel=1e-6)
    w = torch.tensor([2.0, 0.5, 1.0])
    got = classification_loss(logits, labels, w)
    assert got.item() == pytest.approx((2.0 * per_text[0] + 0.5 * per_text[1]) / 2.5, rel=1e-6)


def test_equal_class_weights_change_nothing():
    logits, labels = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 1])
    torch.testing.assert_close(classification_loss(logits, labels, torch.tensor([4.0, 4.0])),
                               classification_loss(logits, labels))


def test_probabilities_and_predictions_follow_the_logits():
    binary = torch.tensor([[0.0], [3.0], [-2.0]])
    probs = class_probabilities(binary)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(binary[:, 0]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert predict(binary).tolist() == [0, 1, 0]
    multi = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    torch.testing.assert_close(class_probabilities(multi), multi.softmax(-1))
    assert predict(multi).tolist() == [1, 0]


# --- learning --------------------------------------------------------------------------------------


def which_comes_first(n: int, T: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texts holding token 1 and token 2 once each among fillers 3..9; label 1 when token 1 comes first.

    Every text has the same bag of special tokens, so only their order tells the label.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    ids = torch.randint(3, 10, (n, T), generator=g)
    labels = torch.empty(n, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        a, b = torch.randperm(L, generator=g)[:2].tolist()
        ids[i, a], ids[i, b] = 1, 2
        ids[i, L:] = 0
        labels[i] = int(a < b)
    return ids, lengths, labels


def test_a_tiny_lstm_learns_which_of_two_tokens_comes_first():
    torch.manual_seed(0)
    model = build_model({"family": "lstm", "vocab_size": 10, "num_classes": 2, "d_model": 8, "hidden_size": 16})
    ids, lengths, labels = which_comes_first(4096)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(0, len(ids), (64,), generator=g)
        loss = classification_loss(model(ids[batch], lengths[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    val_ids, val_lengths, val_labels = which_comes_first(1000, seed=1)
    with torch.no_grad():
        accuracy = (predict(model.eval()(val_ids, val_lengths)) == val_labels).float().mean().item()
    assert accuracy >= 0.95


# --- ONNX ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:# The axis name:UserWarning")  # inside the exporter
@pytest.mark.parametrize("family, extra", [
    ("lstm", {"bidirectional": True, "pooling": "last"}),
    ("gru", {"bidirectional": True, "pooling": "mean"}),
    ("rnn", {"bidirectional": True, "pooling": "max"}),
    ("gpt", {"pooling": "last"}),
], ids=["lstm-bi-last", "gru-bi-mean", "rnn-bi-max", "gpt-last"])
def test_onnx_export_with_dynamic_batch_and_length_matches_eager(family, extra, tmp_path):
    import numpy as np
    import onnxruntime as ort

    model = classifier(family, **extra)
    ids, lengths = ragged_batch(B=2, T=5)  # torch.export specialises sizes 0 and 1: trace with 2 and up
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        program = torch.onnx.export(
            model, (ids, lengths), dynamo=True, verbose=False, opset_version=18,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "lengths": {0: batch}},
            input_names=["input_ids", "lengths"], output_names=["logits"],
        )
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for B, T in [(1, 1), (3, 11), (6, 4)]:
        ids, lengths = ragged_batch(B=B, T=T, seed=B) if B > 2 else (torch.randint(1, V, (B, T)), torch.full((B,), T))
        got = session.run(None, {"input_ids": ids.numpy(), "lengths": lengths.numpy()})[0]
        with torch.no_grad():
            want = model(ids, lengths).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# --- dynamic int8 quantization ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated", "ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_dynamic_int8_quantization_keeps_packed_sequences_working(family):
    from torch.ao.quantization import quantize_dynamic

    model = classifier(family, bidirectional=True, pooling="mean", d_model=32, hidden_size=32)
    quantized = quantize_dynamic(model, {nn.Linear, nn.RNN, nn.LSTM, nn.GRU}, dtype=torch.qint8)
    # lstm and gru become int8 recurrent layers; nn.RNN has no dynamic int8 module and stays float.
    assert type(quantized.rnn).__module__.startswith("torch.ao.nn.quantized.dynamic") == (family != "rnn")
    assert type(quantized.head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    ids, lengths = ragged_batch(B=6, T=10)
    with torch.no_grad():
        want, got = model(ids, lengths), quantized(ids, lengths)
        wider = torch.cat((ids, torch.zeros(6, 3, dtype=torch.long)), dim=1)
        torch.testing.assert_close(quantized(wider, lengths), got, rtol=0, atol=1e-6)  # padding still ignored
    assert got.shape == want.shape and (got - want).abs().max() < 0.05


# --- model dirs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, extra", [
    ("rnn", {}), ("lstm", {"bidirectional": True, "pooling": "max"}), ("gru", {"num_classes": 2}),
    ("gpt", {"pooling": "mean"}), ("gpt", {"num_classes": 2, "tie_embeddings": False}),
], ids=["rnn", "lstm-bi-max", "gru-binary", "gpt-mean", "gpt-binary-untied"])
def test_save_then_load_model_dir_gives_identical_logits(family, extra, tiny_tokenizer_path, tmp_path):
    model = classifier(family, labels=None, **extra)
    dest = tmp_path / "model"
    save_model_dir(model, dest, tokenizer_path=tiny_tokenizer_path, provenance={"step": 3})
    loaded = load_model_dir(dest)
    assert type(loaded.model) is type(model) and loaded.model.config == model.config
    assert loaded.config["family"] == family and loaded.config["num_classes"] == model.num_classes
    ids, lengths = ragged_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, lengths), model(ids, lengths), rtol=0, atol=0)
