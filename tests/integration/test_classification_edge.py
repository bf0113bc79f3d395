"""compress and export of a sequence classifier through the real CLI, on a tiny sentiment LSTM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import assert_clean_failure, run_cli

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sentiment-rnn.yaml"


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    """A work dir with runs/sentiment-rnn/model: an LSTM sentiment classifier trained 3 epochs (a few seconds)."""
    root = tmp_path_factory.mktemp("sentiment")
    shutil.copy(RECIPE, root / "sentiment-rnn.yaml")
    run_cli(root, "train", "sentiment-rnn.yaml", "model.family=lstm", "train.epochs=3")
    return root


def test_compress_int8_and_export_keep_accuracy_and_pass_parity(sentiment: Path) -> None:
    proc = run_cli(sentiment, "compress", "runs/sentiment-rnn/model", "--quantize", "int8", "-o", "out/int8", "--json")
    report = json.loads(proc.stdout)
    saved = json.loads((sentiment / "out/int8/compression.json").read_text())
    assert report["after"] == saved["after"] and report["output"] == "out/int8"
    before, after = saved["before"], saved["after"]
    assert saved["task"] == "classification" and before["backend"] == "torch" and after["backend"] == "torch-int8"
    assert before["examples"] == after["examples"] == 1200  # the whole val split of the recorded dataset
    assert before["accuracy"] > 0.9
    assert after["accuracy"] >= before["accuracy"] - 0.02 and after["macro_f1"] >= before["macro_f1"] - 0.02
    assert after["size_bytes"] < 0.4 * before["size_bytes"] and after["parameters"] == before["parameters"]
    assert after["forward_ms"] > 0 and before["forward_ms"] > 0 and before["forward_batch"] == 32
    assert saved["quantization"]["int8_compute"] == ["rnn (lstm layers, torch dynamic int8)", "head"]
    config = json.loads((sentiment / "out/int8/config.json").read_text())
    original = json.loads((sentiment / "runs/sentiment-rnn/model/config.json").read_text())
    assert config["quantization"]["scheme"] == "int8"
    assert {k: config[k] for k in ("labels", "max_len", "pad_id")} == {k: original[k] for k in ("labels", "max_len", "pad_id")}
    human = run_cli(sentiment, "compress", "runs/sentiment-rnn/model", "--quantize", "int8", "-o", "out/int8",
                    "--overwrite", "--no-speed")
    assert "val accuracy (1,200 texts)" in human.stdout and "val macro-F1" in human.stdout

    export = json.loads(run_cli(sentiment, "export", "runs/sentiment-rnn/model", "-o", "out/onnx", "--quantize", "int8",
                                "--json").stdout)
    assert export["passed"] is True and export["rows"][0]["output"] == "logits"
    out = sentiment / "out/onnx"
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.int8.onnx", "export.json", "tokenizer.json", "config.json"}
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["task"] == "classification" and manifest["labels"] == ["negative", "positive"] and manifest["opset"] == 17
    v = manifest["verification"]
    assert v["passed"] and v["rows"][0]["max_abs"] <= 1e-4 and v["predictions"]["identical"]
    assert v["inputs"].startswith("val texts of") and v["examples"] == 128
    int8 = manifest["int8"]
    assert int8["accuracy"]["int8"] >= int8["accuracy"]["fp32"] - 0.02 and int8["examples"] == 1200
    assert int8["int8_ops"].get("DynamicQuantizeLSTM") == 1

    exported_int8 = json.loads(run_cli(sentiment, "export", "out/int8", "-o", "out/int8-onnx", "--json").stdout)
    assert exported_int8["passed"] is True
    assert json.loads((sentiment / "out/int8-onnx/export.json").read_text())["source_quantization"]["scheme"] == "int8"


def test_bad_classifier_input_exits_2_with_one_message_and_writes_nothing(sentiment: Path) -> None:
    model = "runs/sentiment-rnn/model"
    proc = run_cli(sentiment, "compress", model, "--quantize", "int4-weight", "-o", "out/bad", check=False)
    assert_clean_failure(proc, 2, "classifiers are quantized with int8 only", "Use --quantize int8")
    proc = run_cli(sentiment, "compress", model, "--prune", "0.3", "--prune-method", "structured", "-o", "out/bad", check=False)
    assert_clean_failure(proc, 2, "a classifier takes --prune-method global or layer")

    damaged = sentiment / "damaged"
    shutil.copytree(sentiment / model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for verb in ("compress", "export"):
        args = ["--quantize", "int8"] if verb == "compress" else []
        proc = run_cli(sentiment, verb, "damaged", *args, "-o", "out/bad", check=False)
        assert_clean_failure(proc, 2, "damaged/model.safetensors: cannot load the weights")
        assert len(proc.stderr.strip().splitlines()) <= 2  # the "compressing ..." line and one error paragraph
    assert not (sentiment / "out/bad").exists()


def test_a_second_classifier_eval_says_it_replaces_the_first_ones_report(sentiment: Path) -> None:
    first = run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--out", "reports/twice")
    assert "replacing" not in first.stderr
    second = run_cli(sentiment, "eval", "runs/sentiment-rnn/model", "--out", "reports/twice")
    for name in ("eval.json", "confusion.png"):
        assert f"replacing reports/twice/{name} (written " in second.stderr, second.stderr
    assert "--out DIR or --predictions FILE keeps it" in second.stderr
