"""Hugging Face format both ways: config and weight mapping, export verified with transformers, refusals.

Checkpoints are built here with transformers from a config (random weights, nothing downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llmctl.errors import LlmctlError
from llmctl.export.hf_export import hf_cache_feed
from llmctl.models.gpt import GPT, GPTConfig
from llmctl.models.hf import (
    check_hf_weights,
    gpt_fields_from_hf,
    gpt_tensor_shapes,
    hf_eos_token,
    is_hf_checkpoint,
    read_hf_config,
    resolve_hf_dir,
)
from llmctl.models.model_dir import LoadedModel, load_model_dir, save_model_dir
from llmctl.models.init_from import load_weights_into
from tests.conftest import TINY_MODEL, generated_text

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HF_SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)


def tokenizer_with(special_tokens: list[str], bos: str | None = None, qwen2: bool = False) -> Any:
    """A byte-level BPE tokenizer of at most 300 tokens; with `bos`, a post-processor that puts it before every text;
    `qwen2`: splitting text as Qwen2's tokenizer does (NFC, Qwen2's regex)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.models.hf import QWEN2_PRETOKENIZE_REGEX

    tok = train_tokenizer(generated_text(400).splitlines(), vocab_size=300, min_frequency=1, special_tokens=special_tokens)
    if qwen2:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if bos:
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def hf_checkpoint(path: Path, model_type: str, *, seed: int = 0, shard: bool = False, **config: Any) -> Any:
    """A random-weight HF checkpoint of `model_type` saved in `path` (sharded: many small files), with a tokenizer.

    Every tensor is randomised (norm weights around 1, biases too), so a mapping that drops or swaps one shows.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(classes[model_type](**{**HF_SHAPE, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), max_shard_size="20KB" if shard else "50GB")
    eos = "</s>" if model_type == "llama" else "<|endoftext|>"
    tokens = ["<|endoftext|>"] if eos == "<|endoftext|>" else ["<s>", "</s>"]
    tokenizer_with(tokens, bos="<s>" if model_type == "llama" else None, qwen2=model_type == "qwen2").save(
        str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}))
    return model


def imported(path: Path, context_length: int = 32) -> GPT:
    """The `gpt` model an HF checkpoint maps to, with its weights: what `train model.init_from=PATH` starts from."""
    config = json.loads((path / "config.json").read_text())
    fields, _ = gpt_fields_from_hf(config, "config.json", context_length)
    model = GPT(GPTConfig(**fields, context_length=context_length)).eval()
    load_weights_into(model, path)
    return model


# --- import: HF checkpoint -> llmctl ------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "config", "shard"), [
    ("llama", {}, False),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_theta": 5000.0}, True),
    ("mistral", {"sliding_window": 64}, True),
    ("qwen2", {"tie_word_embeddings": True}, False),
    ("qwen2", {"num_key_value_heads": 1}, True),
    ("llama", {"attention_bias": True}, False),  # o_proj biases too: zeroed below, as gpt has none
])
def test_imported_checkpoint_gives_the_logits_transformers_gives(tmp_path, model_type, config, shard):
    hf = hf_checkpoint(tmp_path / "hf", model_type, shard=shard, **config)
    if config.get("attention_bias"):
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.o_proj.bias.zero_()
        hf.save_pretrained(str(tmp_path / "hf"))
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert is_hf_checkpoint(str(tmp_path / "hf"))
    model = imported(tmp_path / "hf")
    assert model.config.attention_bias is (model_type == "qwen2" or "attention_bias" in config)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, model(ids)
    assert want.abs().max() > 1  # logits big enough that a wrong mapping cannot hide under the tolerance
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with torch.no_grad():  # cached decode: rotary positions past the prefix
        out = hf(input_ids=ids[:, :5], use_cache=True)
        _, past = model(ids[:, :5], use_cache=True)
        want = hf(input_ids=ids[:, 5:6], **hf_cache_feed(hf)(out)).logits
        torch.testing.assert_close(model(ids[:, 5:6], past), want, rtol=0, atol=1e-4)


def test_tensor_shapes_of_a_model_section_are_the_gpt_models_own():
    for fields in ({**TINY_MODEL, "n_kv_head": 1, "d_ff": 48, "tie_embeddings": False, "attention_bias": True},
                   {**TINY_MODEL, "n_kv_head": 2, "head_dim": 8, "d_ff": 40}):
        model = GPT(GPTConfig(**fields))
        assert gpt_tensor_shapes(vars(model.config)) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_eos_token_comes_from_tokenizer_config_else_from_the_config_id(tmp_path):
    hf_checkpoint(tmp_path / "hf", "llama", eos_token_id=1)
    assert hf_eos_token(tmp_path / "hf") == "</s>"
    (tmp_path / "hf" / "tokenizer_config.json").unlink()
    assert hf_eos_token(tmp_path / "hf") == "</s>"  # id 1 in tokenizer.json's added tokens


# --- refusals -----------------------------------------------------------------------------------------


def test_directory_without_config_is_refused_saying_what_it_should_hold(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmctlError, match=r"no config.json; neither an llmctl model dir nor a Hugging Face model dir"):
        read_hf_config(tmp_path / "empty")


@pytest.mark.parametrize(("config", "named"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2, "n_head": 4,
      "activation_function": "gelu_new"}, r"model_type 'gpt2' \(GPT2LMHeadModel\) is not an architecture.*activation_function, n_embd"),
    ({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "new_decoder_architecture": True,
      "parallel_attn": True}, r"model_type 'falcon' is not .* llama, mistral, qwen2.*new_decoder_architecture, parallel_attn"),
    ({"model_type": "llama", **HF_SHAPE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling .*linear.*not implemented"),
    ({"model_type": "llama", **HF_SHAPE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, r"rope_parameters.rope_type 'llama3'"),
    ({"model_type": "llama", **HF_SHAPE, "attention_bias": True, "mlp_bias": True}, r"mlp_bias true: the gpt family's MLP has no biases"),
    ({"model_type": "llama", **HF_SHAPE, "hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"model_type": "llama", **HF_SHAPE, "quantization_config": {"quant_method": "gptq"}}, r"quantization_config: a quantized checkpoint"),
    ({"model_type": "llama", **HF_SHAPE, "num_experts": 8, "moe_topk": 2}, r"moe_topk, num_experts: not fields of a plain llama config"),
    ({"model_type": "mistral", **HF_SHAPE, "sliding_window": 16}, r"sliding_window 16: shorter than model.context_length 32.*at most 16"),
    ({"model_type": "qwen2", **HF_SHAPE, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     r"use_sliding_window with sliding_window 8 \(layers \[1\]\)"),
    ({"model_type": "llama", **HF_SHAPE, "max_position_embeddings": 16}, r"max_position_embeddings 16: model.context_length 32 is longer"),
])
def test_unmappable_config_is_refused_naming_the_fields(config, named):
    with pytest.raises(LlmctlError, match=named):
        gpt_fields_from_hf(config, "hf/config.json", 32)


def test_sliding_window_no_shorter_than_the_context_is_mapped_to_full_attention_with_a_note():
    fields, notes = gpt_fields_from_hf({"model_type": "mistral", **HF_SHAPE, "sliding_window": 4096}, "c", 32)
    assert fields["n_kv_head"] == 2 and fields["tie_embeddings"] is False
    assert notes == ["sliding_window 4096 is no shorter than model.context_length 32: full attention is the same"]


def test_safetensors_that_do_not_match_the_config_are_refused_naming_the_tensor(tmp_path):
    hf_checkpoint(tmp_path / "hf", "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    fields, _ = gpt_fields_from_hf(config, "c", 32)
    with pytest.raises(LlmctlError, match=r"model.safetensors: model.layers.0.mlp.down_proj.weight is \[32, 64\], "
                                          r"config.json describes \[32, 48\].*\(and 3 more\)"):
        check_hf_weights(tmp_path / "hf", gpt_tensor_shapes(fields))
    with pytest.raises(LlmctlError, match=r"model.init_from: .*down_proj.weight is \[32, 64\]"):
        load_weights_into(GPT(GPTConfig(**fields, context_length=32)), tmp_path / "hf")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_checkpoint(tmp_path / "hf", "llama")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors.pop("model.norm.weight")
    tensors["model.layers.0.mlp.up_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    fields, _ = gpt_fields_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()), "c", 32)
    with pytest.raises(LlmctlError, match=r"missing model.norm.weight; unexpected model.layers.0.mlp.up_proj.bias"):
        check_hf_weights(tmp_path / "hf", gpt_tensor_shapes(fields))


def test_llama_with_nonzero_o_proj_biases_is_refused_naming_the_tensor(tmp_path):
    hf_checkpoint(tmp_path / "hf", "llama", attention_bias=True)  # random o_proj biases
    with pytest.raises(LlmctlError, match=r"model.layers.0.self_attn.o_proj.bias is not zero .*no o_proj bias"):
        imported(tmp_path / "hf")


def test_pickled_weights_alone_are_refused_with_the_conversion(tmp_path):
    hf_checkpoint(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(LlmctlError, match=r"PyTorch pickle files only; llmctl reads safetensors"):
        check_hf_weights(tmp_path / "hf", {})


# --- hf:ORG/NAME: the local cache only ----------------------------------------------------------------


def test_hf_name_resolves_to_its_snapshot_in_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    hf_checkpoint(snapshot, "llama")
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_hf_dir("hf:tiny-org/tiny-llama") == snapshot
    with pytest.raises(LlmctlError, match=r"hf:tiny-org/missing: not in the local Hugging Face cache .*never downloads"):
        resolve_hf_dir("hf:tiny-org/missing")
    with pytest.raises(LlmctlError, match=r"expected hf:ORG/NAME"):
        resolve_hf_dir("hf:no-org")


# --- the recipe: its model section and tokenizer come from the checkpoint -----------------------------


def test_recipe_takes_shape_tokenizer_and_eos_from_the_checkpoint(tmp_path, tiny_recipe):
    from llmctl.config import load_recipe

    hf_checkpoint(tmp_path / "hf", "qwen2", tie_word_embeddings=True)
    recipe = load_recipe(tiny_recipe("r"), ["model.init_from=hf"])
    m = recipe.model
    assert (m.n_layer, m.n_head, m.n_kv_head, m.d_model, m.d_ff, m.vocab_size) == (2, 4, 2, 32, 64, 300)
    assert m.attention_bias and m.tie_embeddings and m.norm_eps == 1e-6 and m.context_length == 32
    assert recipe.data.tokenizer == str(Path("hf") / "tokenizer.json")
    assert recipe.data.special_tokens == ["<|endoftext|>"]
    with pytest.raises(LlmctlError, match=r"command line model.init_from: model.n_layer=3 \(the checkpoint has 2\).*drop the override"):
        load_recipe(tiny_recipe("r"), ["model.init_from=hf", "model.n_layer=3"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LlmctlError, match=r"command line model.init_from: nothing has no config.json"):
        load_recipe(tiny_recipe("r"), ["model.init_from=nothing"])


def test_recipe_with_a_bad_checkpoint_fails_at_load_naming_the_recipe_line(tmp_path, tiny_recipe):
    from llmctl.config import load_recipe

    hf_checkpoint(tmp_path / "hf", "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(LlmctlError, match=r"r.yaml:\d+ model.init_from: hf/config.json: cannot import this llama checkpoint: "
                                          r"rope_parameters.rope_type 'dynamic'"):
        load_recipe(tiny_recipe("r", model={"init_from": "hf"}))


# --- export: llmctl -> HF -----------------------------------------------------------------------------


def model_dir(root: Path, *, special_tokens=("<|endoftext|>",), bos: str | None = None, chat_template: str | None = None,
              qwen2_tokenizer: bool = False, seed: int = 0, **config: Any) -> LoadedModel:
    tok = tokenizer_with(list(special_tokens), bos=bos, qwen2=qwen2_tokenizer)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY_MODEL, **config})).eval()
    with torch.no_grad():  # trained-looking weights: norms off 1, biases off 0
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    provenance = {"step": 3, "recipe": {"data": {"special_tokens": list(special_tokens)}}}
    save_model_dir(model, root / "model", tokenizer_path=root / "tokenizer.json", provenance=provenance,
                   extra_config={"chat_template": chat_template} if chat_template else None)
    return load_model_dir(root / "model")


def val_tokens(loaded: LoadedModel) -> np.ndarray:
    return np.array(loaded.tokenizer.encode(generated_text(60, seed=7)).ids, dtype=np.uint16)


@pytest.mark.parametrize(("config", "architecture"), [
    ({}, "LlamaForCausalLM"),
    ({"tie_embeddings": False, "n_head": 4, "n_kv_head": 1, "rope_theta": 5000.0}, "LlamaForCausalLM"),
    ({"attention_bias": True, "qwen2_tokenizer": True}, "Qwen2ForCausalLM"),
    # transformers rebuilds a qwen2 model's tokenizer as Qwen2's: with another one, biases go out as Llama's
    ({"attention_bias": True}, "LlamaForCausalLM"),
])
def test_export_gives_transformers_the_logits_llmctl_gives(tmp_path, config, architecture):
    from transformers import AutoModelForCausalLM

    from llmctl.export.hf_export import export_hf

    loaded = model_dir(tmp_path, **config)
    tokens = val_tokens(loaded)
    report = export_hf(loaded, tmp_path / "hf", eval_tokens=tokens)
    assert report.passed, report.failure
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "export.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((out / "export.json").read_text())
    v = manifest["verification"]
    assert manifest["format"] == "hf" and manifest["architecture"] == architecture
    assert v["inputs"] == "val tokens" and v["logits_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4
    assert v["greedy"]["identical"] and v["tokenizer"]["identical"] and v["tokenizer"]["texts"] >= 5
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == architecture
    ids = torch.as_tensor(tokens[:64].astype(np.int64)).view(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, loaded.model(ids), rtol=0, atol=1e-4)
    # and back: the export is an HF checkpoint llmctl imports to the same model
    torch.testing.assert_close(imported(out)(ids), loaded.model(ids), rtol=0, atol=1e-6)


def test_exported_tokenizer_encodes_like_tokenizers_with_its_bos_eos_and_chat_template(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    from llmctl.export.hf_export import export_hf

    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    loaded = model_dir(tmp_path, special_tokens=("</s>", "<s>", "<|im_start|>"), bos="<s>", chat_template=template)
    assert export_hf(loaded, tmp_path / "hf", eval_tokens=val_tokens(loaded)).passed
    auto, plain = AutoTokenizer.from_pretrained(str(tmp_path / "hf")), Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in ("def f(x):\n    return x  # naïve café", "<|im_start|>user\nhi</s>", generated_text(5, seed=3)):
        assert auto(text)["input_ids"] == plain.encode(text).ids
        assert auto(text)["input_ids"][0] == plain.token_to_id("<s>")
    assert (auto.bos_token, auto.eos_token) == ("<s>", "</s>")
    chat = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi</s>\n"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (plain.token_to_id("<s>"), plain.token_to_id("</s>"))
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == plain.token_to_id("</s>")


def test_quantized_model_dir_exports_its_dequantized_weights(tmp_path):
    from llmctl.compression.quantization import dequantize, quantize_model
    from llmctl.export.hf_export import export_hf

    loaded = model_dir(tmp_path)
    quantized = quantize_model(loaded.model, "int8-weight")
    save_model_dir(quantized, tmp_path / "q", tokenizer_path=tmp_path / "tokenizer.json", provenance=loaded.provenance)
    q = load_model_dir(tmp_path / "q")
    report = export_hf(q, tmp_path / "hf", eval_tokens=val_tokens(q))
    assert report.passed, report.failure
    manifest = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert manifest["source_quantization"] == {"scheme": "int8-weight"}
    assert "dequantized" in manifest["verification"]["reference"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(imported(tmp_path / "hf")(ids), dequantize(q.model)(ids), rtol=0, atol=1e-6)


def test_export_that_disagrees_is_kept_and_reported_failed(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from llmctl.export import hf_export

    write = hf_export._write_weights

    def write_off_by_a_little(model, path, **kwargs):  # what a mapping bug would write
        size = write(model, path, **kwargs)
        tensors = load_file(str(path))
        tensors["model.norm.weight"] += 1e-3
        save_file(tensors, str(path), metadata={"format": "pt"})
        return size

    monkeypatch.setattr(hf_export, "_write_weights", write_off_by_a_little)
    loaded = model_dir(tmp_path)
    report = hf_export.export_hf(loaded, tmp_path / "hf", eval_tokens=val_tokens(loaded))
    assert not report.passed
    assert report.failure.startswith("transformers and llmctl disagree: logits differ by up to")
    manifest = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert manifest["verification"]["passed"] is False and manifest["verification"]["logits_max_abs_diff"] > 1e-4
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_classifier_is_refused_naming_the_onnx_format(tmp_path):
    from llmctl.tasks.classification.export import export_hf
    from llmctl.models.registry import build_model

    classifier = build_model({"family": "gpt", **TINY_MODEL, "num_classes": 2, "pad_id": 0})
    loaded = LoadedModel(classifier, {"family": "gpt", "num_classes": 2}, None, {}, tmp_path / "clf")
    with pytest.raises(LlmctlError, match=r"is a classifier; .*Export it with --format onnx"):
        export_hf(loaded, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_onnx_export_keeps_the_attention_biases(tmp_path):
    from llmctl.tasks.lm.export import export_onnx
    from llmctl.models.onnx_model import OnnxCausalLM

    loaded = model_dir(tmp_path, attention_bias=True)
    report = export_onnx(loaded, tmp_path / "onnx", eval_tokens=val_tokens(loaded))
    assert report.passed, report.failure
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(OnnxCausalLM(tmp_path / "onnx")(ids), loaded.model(ids), rtol=0, atol=1e-5)


def test_unknown_fields_that_are_switched_off_or_private_are_ignored():
    config = {"model_type": "qwen2", **HF_SHAPE, "use_mrope": False, "some_feature": None, "other_switch": False,
              "_attn_implementation_autoset": True}
    fields, _ = gpt_fields_from_hf(config, "c", 32)
    assert fields["attention_bias"] is True
    with pytest.raises(LlmctlError, match=r"use_mrope true: multimodal rotary"):
        gpt_fields_from_hf({**config, "use_mrope": True}, "c", 32)
