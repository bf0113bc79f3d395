"""Classifiers at the edge: int8 model dirs (layout, round trip, what runs in int8), pruning, ONNX export and OnnxClassifier."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmctl.compression.classifier_quant import dequantize_classifier, quantize_classifier
from llmctl.compression.pruning import prune_unstructured
from llmctl.errors import LlmctlError
from llmctl.models import build_model
from llmctl.models.classifiers import classification_loss, predict
from llmctl.models.loading import load_for_inference
from llmctl.models.model_dir import load_model_dir, save_model_dir
from llmctl.models.quantized import DynamicInt8Linear, Int8Embedding
from llmctl.models.quantized_classifiers import Int8Recurrent

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:# The axis name:UserWarning"),  # inside the exporter
]

V = 300  # the tiny tokenizer's vocabulary (see conftest.tiny_tokenizer_path)
LABELS = ["second-first", "first-first"]
SHAPES = {
    "rnn": {"family": "rnn", "d_model": 16, "hidden_size": 32},
    "lstm": {"family": "lstm", "d_model": 16, "hidden_size": 32, "n_layer": 2, "bidirectional": True},
    "gru": {"family": "gru", "d_model": 16, "hidden_size": 32},
    "gpt": {"family": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "context_length": 32},
}
FAMILIES = list(SHAPES)


def which_comes_first(n: int, T: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded texts (n, T) of filler tokens 3..9 holding tokens 1 and 2 once each; label 1 when 1 comes first."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    ids = torch.randint(3, 10, (n, T), generator=g)
    labels = torch.empty(n, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        a, b = torch.randperm(L, generator=g)[:2].tolist()
        ids[i, a], ids[i, b] = 1, 2
        ids[i, L:] = 0
        labels[i] = int(a < b)
    return ids, lengths, labels


_TRAINED: dict[str, Any] = {}


def trained(family: str) -> Any:
    """A float classifier of `family` trained to tell which of two tokens comes first (cached per module)."""
    if family not in _TRAINED:
        torch.manual_seed(0)
        model = build_model({"vocab_size": V, "num_classes": 2, "pad_id": 0, "labels": LABELS, "max_len": 12,
                             **SHAPES[family]})
        ids, lengths, labels = which_comes_first(2048)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(150):
            batch = torch.randint(0, len(ids), (64,), generator=g)
            loss = classification_loss(model(ids[batch], lengths[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED[family] = model.eval()
    return copy.deepcopy(_TRAINED[family])


def model_dir(model: Any, root: Path, tokenizer_path: Path, name: str = "model") -> Path:
    save_model_dir(model, root / name, tokenizer_path=tokenizer_path, provenance={"step": 150})
    return root / name


# --- int8 model dirs -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_round_trip_keeps_predictions_and_the_config_and_shrinks_the_file(family, tiny_tokenizer_path, tmp_path):
    model = trained(family)
    float_dir = model_dir(model, tmp_path, tiny_tokenizer_path, "float")
    quantized = quantize_classifier(model)
    q_dir = model_dir(quantized, tmp_path, tiny_tokenizer_path, "int8")

    loaded = load_model_dir(q_dir)
    assert loaded.model.task == "classification" and loaded.model.quantization["scheme"] == "int8"
    for key in ("labels", "max_len", "pad_id", "num_classes"):
        assert loaded.config[key] == json.loads((float_dir / "config.json").read_text())[key]
    assert loaded.config["quantization"] == {"scheme": "int8", "weights": "int8-per-row"}
    ids, lengths, labels = which_comes_first(512, seed=1)
    with torch.no_grad():
        float_logits, int8_logits = model(ids, lengths), loaded.model(ids, lengths)
        torch.testing.assert_close(quantized(ids, lengths), int8_logits, rtol=0, atol=0)  # what compress measured is what loads
    float_pred, int8_pred = predict(float_logits), predict(int8_logits)
    assert (float_pred == labels).float().mean() > 0.85  # the float model did learn the task
    assert (int8_pred == float_pred).float().mean() >= 0.97
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(q_dir) < 0.45 * size(float_dir)
    assert type(load_for_inference(q_dir).model) is type(model)


def test_model_safetensors_holds_int8_rows_with_float_scales_and_float_biases(tiny_tokenizer_path, tmp_path):
    q_dir = model_dir(quantize_classifier(trained("lstm")), tmp_path, tiny_tokenizer_path)
    with safe_open(str(q_dir / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    matrices = ["embed.weight", "head.weight"] + [f"rnn.weight_{k}_l{i}{s}" for k in ("ih", "hh") for i in (0, 1) for s in ("", "_reverse")]
    for name in matrices:
        assert tensors[name].dtype == torch.int8, name
        assert tensors[name + "_scale"].dtype == torch.float32 and tensors[name + "_scale"].shape == tensors[name].shape[:1]
    biases = [k for k in tensors if "bias" in k]
    assert biases and all(tensors[k].dtype == torch.float32 for k in biases)
    assert set(tensors) == {*matrices, *(m + "_scale" for m in matrices), *biases}


@pytest.mark.parametrize("family", ["rnn", "lstm", "gru"])
def test_lstm_and_gru_recur_in_int8_while_rnn_recurs_in_float_and_every_head_is_int8(family):
    model = quantize_classifier(trained(family))
    assert isinstance(model.rnn, Int8Recurrent) and isinstance(model.embed, Int8Embedding)
    assert isinstance(model.head, DynamicInt8Linear) and model.head.bias is not None
    if family == "rnn":
        assert all(p.dtype == torch.float32 for p in model.rnn._params)  # dequantized at load
    else:
        assert all(isinstance(p, torch.ScriptObject) for p in model.rnn._params)  # fbgemm's packed int8 cells


@pytest.mark.parametrize("family", ["rnn", "lstm", "gru"])
def test_a_quantized_recurrent_classifier_still_never_reads_padding(family):
    model = quantize_classifier(trained(family))
    ids, lengths, _ = which_comes_first(16, seed=2)
    other_padding = ids.clone()
    other_padding[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 7
    wider = torch.cat((other_padding, torch.full((16, 5), 4)), dim=1)
    with torch.no_grad():
        want = model(ids, lengths)
        torch.testing.assert_close(model(wider, lengths), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_dequantize_gives_the_float_classifier_of_the_int8_weights(family):
    float_model = trained(family)
    quantized = quantize_classifier(float_model)
    plain = dequantize_classifier(quantized)
    assert type(plain) is type(float_model) and not getattr(plain, "quantization", None)
    state = quantized.state_dict()
    name = "embed.weight" if family != "gpt" else "model.embed_tokens.weight"
    torch.testing.assert_close(plain.state_dict()[name], state[name].float() * state[name + "_scale"][:, None])
    ids, lengths, _ = which_comes_first(64, seed=3)
    with torch.no_grad():
        assert (predict(plain(ids, lengths)) == predict(quantized(ids, lengths))).float().mean() >= 0.97


@pytest.mark.parametrize("scheme", ["int8-weight", "int4-weight"])
def test_classifiers_refuse_the_weight_only_schemes_naming_int8(scheme):
    with pytest.raises(LlmctlError, match=rf"--quantize {scheme}: classifiers are quantized with int8 only.*Use --quantize int8"):
        quantize_classifier(trained("gru"), scheme)


def test_a_quantized_classifier_dir_with_a_mismatched_tensor_is_refused_naming_it(tiny_tokenizer_path, tmp_path):
    q_dir = model_dir(quantize_classifier(trained("gru")), tmp_path, tiny_tokenizer_path)
    tensors = load_file(str(q_dir / "model.safetensors"))
    tensors["head.weight"] = tensors["head.weight"].float()
    save_file(tensors, str(q_dir / "model.safetensors"))
    with pytest.raises(LlmctlError, match=r"tensor 'head.weight' is float32 \(1, 32\), expected int8 \(1, 32\).*llmctl compress"):
        load_model_dir(q_dir)


def test_magnitude_pruning_of_a_recurrent_classifier_zeroes_its_recurrent_weights_only():
    model = trained("lstm")
    embed = model.embed.weight.detach().clone()
    stats = prune_unstructured(model, 0.5, scope="global")
    recurrent = [getattr(model.rnn, n) for n in model.rnn._flat_weights_names if n.startswith("weight_")]
    zeros = sum(int((w == 0).sum()) for w in recurrent)
    assert stats["prunable_weights"] == sum(w.numel() for w in recurrent)
    assert zeros == stats["pruned_weights"] == pytest.approx(0.5 * stats["prunable_weights"], abs=1)
    assert torch.equal(model.embed.weight, embed)
    ids, lengths, _ = which_comes_first(4, seed=4)
    with torch.no_grad():
        assert torch.isfinite(model(ids, lengths)).all()  # nn.LSTM's flat weights follow the pruned tensors


# --- ONNX export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """lstm (bidirectional, 2 layers) and gpt classifier model dirs exported at the default opset."""
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.tasks.classification.export import export_onnx
    from tests.conftest import generated_text

    root = tmp_path_factory.mktemp("classifier-export")
    tok = train_tokenizer(generated_text(400).splitlines(), vocab_size=V, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok.save(str(root / "tokenizer.json"))
    out = {}
    for family in ("lstm", "gpt"):
        loaded = load_model_dir(model_dir(trained(family), root, root / "tokenizer.json", family))
        report = export_onnx(loaded, root / f"{family}-onnx")
        assert report.passed, report.failure
        out[family] = root / f"{family}-onnx"
    return out


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_export_writes_a_classifier_graph_with_ragged_parity_figures(exported, family):
    import onnx

    d = exported[family]
    manifest = json.loads((d / "export.json").read_text())
    assert manifest["task"] == "classification" and manifest["labels"] == LABELS and manifest["opset"] == 17
    assert [(i["name"], i["dtype"], i["axes"]) for i in manifest["inputs"]] == [
        ("input_ids", "int64", ["batch", "sequence"]), ("lengths", "int64", ["batch"])]
    assert [(o["name"], o["axes"]) for o in manifest["outputs"]] == [("logits", ["batch", 1])]
    assert ("LSTM" in manifest["op_types"]) == (family == "lstm")
    v = manifest["verification"]
    assert v["passed"] and v["rows"][0]["max_abs"] <= v["atol"]
    assert v["batch_sizes"] == [1, 2, 5, 8, 16, 32, 64] and v["predictions"] == {"compared": 128, "identical": True, "first_difference": None}
    assert v["inputs"].startswith("random token ids")  # this model dir records no dataset
    onnx.checker.check_model(str(d / "model.onnx"))
    assert {f.name for f in d.iterdir()} == {"model.onnx", "export.json", "tokenizer.json", "config.json", "llmctl.json"}


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_load_for_inference_gives_an_onnx_classifier_that_matches_torch_and_ignores_padding(exported, family):
    from llmctl.models.onnx_classifier import OnnxClassifier

    loaded = load_for_inference(exported[family])
    assert isinstance(loaded.model, OnnxClassifier) and loaded.model.task == "classification"
    assert loaded.config["labels"] == LABELS and loaded.config["max_len"] == 12 and loaded.config["pad_id"] == 0
    ids, lengths, _ = which_comes_first(9, seed=5)
    other_padding = ids.clone()
    other_padding[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 5
    wider = torch.cat((other_padding, torch.full((9, 4), 6)), dim=1)
    got = loaded.model(ids, lengths)
    with torch.no_grad():
        torch.testing.assert_close(got, trained(family)(ids, lengths), rtol=0, atol=1e-4)
    torch.testing.assert_close(loaded.model(wider, lengths), got, rtol=0, atol=1e-5)
    for b in range(3):  # a row alone gives what it gave in the batch
        torch.testing.assert_close(loaded.model(ids[b : b + 1, : int(lengths[b])], lengths[b : b + 1]), got[b : b + 1], rtol=0, atol=1e-5)


def test_a_changed_torch_model_fails_classifier_parity_naming_logits(exported):
    from llmctl.tasks.classification.parity import verify_classifier_parity
    from llmctl.models.onnx_classifier import OnnxClassifier

    changed = trained("lstm")
    with torch.no_grad():
        changed.head.bias += 0.01
    ids, lengths, _ = which_comes_first(40, seed=6)
    result = verify_classifier_parity(changed, OnnxClassifier(exported["lstm"]), ids.numpy(), lengths.numpy(), atol=1e-4)
    assert not result.passed and result.rows[0].output == "logits" and not result.rows[0].passed
    assert result.failure.startswith("ONNX Runtime and PyTorch disagree: logits differs by up to 0.01")


def test_an_int8_classifier_dir_exports_as_the_float_model_of_its_weights(tiny_tokenizer_path, tmp_path):
    from llmctl.tasks.classification.export import export_onnx

    loaded = load_model_dir(model_dir(quantize_classifier(trained("gru")), tmp_path, tiny_tokenizer_path))
    report = export_onnx(loaded, tmp_path / "onnx")
    assert report.passed, report.failure
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert manifest["source_quantization"]["scheme"] == "int8"
    assert manifest["verification"]["reference"] == "PyTorch fp32, dequantized from the model dir's int8 weights"
    assert "quantization" not in json.loads((tmp_path / "onnx" / "config.json").read_text())  # the graph is float


def test_a_classifier_export_refuses_an_opset_below_17_before_any_work(tiny_tokenizer_path, tmp_path):
    from llmctl.tasks.classification.export import export_onnx

    loaded = load_model_dir(model_dir(trained("rnn"), tmp_path, tiny_tokenizer_path))
    with pytest.raises(LlmctlError, match="--opset 16: the exported graph needs opset 17 or newer"):
        export_onnx(loaded, tmp_path / "onnx", opset=16)
    assert not (tmp_path / "onnx").exists()
