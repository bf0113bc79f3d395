"""Hugging Face checkpoints through the real CLI: import one built here (random weights, nothing downloaded),
train a few steps, export --format hf, reload with transformers; bad checkpoints exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import assert_clean_failure, run_cli, run_cli_with

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
EOS = {"llama": "</s>", "mistral": "</s>", "qwen2": "<|endoftext|>"}


def build_checkpoint(path: Path, corpus: Path, model_type: str, **config) -> None:
    """A random-weight HF checkpoint (config.json, safetensors, tokenizer files) with a tokenizer trained on `corpus`.

    Qwen2's splits text as transformers' Qwen2Tokenizer does; Llama's and Mistral's put <s> before every text.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.models.hf import QWEN2_PRETOKENIZE_REGEX

    lines = [line for f in sorted(corpus.glob("*.txt")) for line in f.read_text().splitlines()]
    specials = ["<|endoftext|>"] if model_type == "qwen2" else ["<s>", "</s>"]
    tok = train_tokenizer(lines, vocab_size=300, min_frequency=1, special_tokens=specials)
    if model_type == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(classes[model_type](**{**SHAPE, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), max_shard_size="40KB")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": EOS[model_type]}))


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()(input_ids=ids).logits


@pytest.mark.parametrize(("model_type", "config"), [
    ("qwen2", {"tie_word_embeddings": True}),
    ("llama", {}),
    ("mistral", {"sliding_window": 4096}),
])
def test_import_train_export_gives_transformers_the_trained_models_logits(workdir: Path, model_type, config) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from llmctl.data.shards import TokenShards
    from llmctl.models.model_dir import load_model_dir

    build_checkpoint(workdir / "hf", workdir / "corpus", model_type, **config)
    train = run_cli(workdir, "train", "tiny.yaml", "model.init_from=hf", "train.max_steps=3", "train.eval_every=3",
                    "train.checkpoint_every=3", "--json")
    assert f"starting from hf: {model_type}, 2 layers, d_model 32, 4 heads (2 key/value)" in train.stderr
    result = json.loads(train.stdout)
    # The dataset was prepared with the checkpoint's tokenizer and end-of-sequence token.
    assert (workdir / "data/tiny/tokenizer.json").read_text() == (workdir / "hf/tokenizer.json").read_text()
    meta = json.loads((workdir / "data/tiny/meta.json").read_text())
    assert meta["special_tokens"] == [EOS[model_type]]
    # Training started from the checkpoint's weights (random ones, std 0.1) and moved them a little.
    start = {}
    for shard in sorted((workdir / "hf").glob("*.safetensors")):
        start.update(load_file(str(shard)))
    trained = load_file(str(workdir / "runs/tiny/model/model.safetensors"))
    moved = max(float((trained[k] - v).abs().max()) for k, v in start.items())
    assert 0 < moved < 0.05, moved
    config_json = json.loads((workdir / "runs/tiny/model/config.json").read_text())
    assert (config_json["n_head"], config_json["n_kv_head"], config_json["attention_bias"]) == (4, 2, model_type == "qwen2")

    proc = run_cli(workdir, "export", "runs/tiny/model", "--format", "hf", "-o", "out/hf")
    assert "transformers" in proc.stdout and "logits" in proc.stdout and "decode logits" in proc.stdout
    manifest = json.loads((workdir / "out/hf/export.json").read_text())
    assert manifest["format"] == "hf" and manifest["verification"]["passed"] is True
    assert manifest["architecture"] == ("Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM")
    assert manifest["verification"]["inputs"] == "val tokens"
    assert manifest["verification"]["logits_max_abs_diff"] < 1e-4

    val = TokenShards(workdir / "data/tiny").split("val")
    ids = torch.as_tensor(np.asarray(val[:64], dtype=np.int64)).view(2, 32)
    loaded = load_model_dir(workdir / result["model_dir"])
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(workdir / "out/hf", ids), loaded.model(ids), rtol=0, atol=1e-4)
    text = (workdir / "corpus/doc0.txt").read_text()[:500]
    assert AutoTokenizer.from_pretrained(str(workdir / "out/hf"))(text)["input_ids"] == loaded.tokenizer.encode(text).ids
    # llmctl reads the HF dir back too: eval scores it like the model dir it came from.
    from_hf = json.loads(run_cli(workdir, "eval", "out/hf", "--data", "data/tiny", "--max-tokens", "512", "--json").stdout)
    original = json.loads(run_cli(workdir, "eval", "runs/tiny/model", "--max-tokens", "512", "--json").stdout)
    assert from_hf["perplexity"] == pytest.approx(original["perplexity"], rel=1e-4)


def test_bad_checkpoints_exit_2_naming_the_problem(workdir: Path) -> None:
    (workdir / "empty").mkdir()
    build_checkpoint(workdir / "falcon", workdir / "corpus", "llama")
    falcon = json.loads((workdir / "falcon/config.json").read_text())
    (workdir / "falcon/config.json").write_text(json.dumps({**falcon, "model_type": "falcon", "parallel_attn": True}))
    build_checkpoint(workdir / "scaled", workdir / "corpus", "llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
    build_checkpoint(workdir / "wrong", workdir / "corpus", "llama")
    wrong = json.loads((workdir / "wrong/config.json").read_text())
    (workdir / "wrong/config.json").write_text(json.dumps({**wrong, "intermediate_size": 96}))

    cases = [
        ("empty", "model.init_from", "empty has no config.json", "Hugging Face model dir"),
        ("falcon", "model_type 'falcon'", "not an architecture llmctl can import", "parallel_attn"),
        ("scaled", "rope_parameters.rope_type 'linear'", "only the default rotary embedding"),
        ("wrong", "mlp.down_proj.weight is [32, 64], config.json describes [32, 96]"),
    ]
    for path, *needles in cases:
        proc = run_cli(workdir, "train", "tiny.yaml", f"model.init_from={path}", check=False)
        assert_clean_failure(proc, 2, *needles)
    proc = run_cli(workdir, "train", "tiny.yaml", "model.init_from=wrong", "--json", check=False)
    assert json.loads(proc.stdout)["error"]["message"].startswith("command line model.init_from: wrong: the safetensors")
    assert not (workdir / "runs").exists() and not (workdir / "data").exists()  # refused before any work


def test_hf_name_missing_from_the_local_cache_exits_2(workdir: Path) -> None:
    env = {"HF_HUB_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli_with(workdir, env, "train", "tiny.yaml", "model.init_from=hf:tiny-org/tiny-model", check=False)
    assert_clean_failure(proc, 2, "hf:tiny-org/tiny-model: not in the local Hugging Face cache", "never downloads")


def test_export_hf_refuses_onnx_options(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")
    proc = run_cli(workdir, "export", "runs/tiny/model", "--format", "hf", "--quantize", "int8", "-o", "out/hf", check=False)
    assert_clean_failure(proc, 2, "--quantize: ONNX options; --format hf")
    proc = run_cli(workdir, "export", "runs/tiny/model", "--format", "gguf", "-o", "out/hf", check=False)
    assert_clean_failure(proc, 2, "--format 'gguf': expected onnx or hf")
    assert not (workdir / "out/hf").exists()
