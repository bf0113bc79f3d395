"""Quantization: each scheme's logits against float, model dirs with integer tensors, dequantize, bad dirs."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmctl.compression import quantization
from llmctl.compression.pruning import prune_structured
from llmctl.compression.quantization import dequantize, quantize_model
from llmctl.errors import LlmctlError
from llmctl.models.gpt import GPT
from llmctl.models.model_dir import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 300  # the tiny model's vocab_size (see conftest.TINY_MODEL)
SCHEMES = ["int8", "int8-weight", "int4-weight"]
# RMS error of the logits relative to their RMS, measured ~0.01 (int8), ~0.008 (int8-weight), ~0.025 (int4).
TOLERANCE = {"int8": 0.03, "int8-weight": 0.03, "int4-weight": 0.08}
WEIGHT_DTYPE = {"int8": "I8", "int8-weight": "I8", "int4-weight": "U8"}


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def quantized_copy(model: GPT, scheme: str) -> GPT:
    return quantize_model(copy.deepcopy(model), scheme)


def save(model: GPT, path, tokenizer_path) -> None:
    save_model_dir(model, path, tokenizer_path=tokenizer_path, provenance={"step": 3})


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_round_trips_through_a_model_dir_close_to_float(
    tiny_gpt, tiny_tokenizer_path, tmp_path, scheme, tie
):
    model = tiny_gpt(tie_embeddings=tie)
    x = tokens(2, 12)
    with torch.no_grad():
        ref = model(x)
        quantized = quantized_copy(model, scheme)
        y = quantized(x)
        save(quantized, tmp_path / "q", tiny_tokenizer_path)
        loaded = load_model_dir(tmp_path / "q")
        assert relative_error(y, ref) < TOLERANCE[scheme]
        assert torch.equal(loaded.model(x), y)
    assert loaded.config["quantization"]["scheme"] == scheme
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == quantized.quantization
    assert loaded.model.quantization == quantized.quantization and not loaded.model.training
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == ["config.json", "llmctl.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_safetensors_holds_integer_weights_and_float_scales_not_a_pickle(
    tiny_gpt, tiny_tokenizer_path, tmp_path, scheme
):
    save(quantized_copy(tiny_gpt(), scheme), tmp_path / "q", tiny_tokenizer_path)
    path = tmp_path / "q" / "model.safetensors"
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw bytes
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch.save zip
    with safe_open(str(path), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == WEIGHT_DTYPE[scheme]
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == WEIGHT_DTYPE[scheme]
    assert dtypes["model.layers.0.self_attn.q_proj.weight_scale"] == ("BF16" if scheme == "int4-weight" else "F32")
    assert dtypes["model.embed_tokens.weight"] == "I8" and dtypes["model.embed_tokens.weight_scale"] == "F32"
    assert dtypes["model.norm.weight"] == "F32"
    assert not any(k.startswith("lm_head.") for k in dtypes)  # the tied head is the embedding, stored once


def test_int8_model_file_is_under_a_third_of_the_float_one(tiny_gpt, tiny_tokenizer_path, tmp_path):
    model = tiny_gpt(d_model=128, n_head=4, vocab_size=V)  # wide enough for per-row scales to be small change
    save(model, tmp_path / "fp32", tiny_tokenizer_path)
    save(quantized_copy(model, "int8"), tmp_path / "int8", tiny_tokenizer_path)
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "int8")}
    assert size["int8"] <= 0.3 * size["fp32"]


def test_tied_head_shares_the_int8_embedding_after_loading(tiny_gpt, tiny_tokenizer_path, tmp_path):
    save(quantized_copy(tiny_gpt(), "int8-weight"), tmp_path / "q", tiny_tokenizer_path)
    model = load_model_dir(tmp_path / "q").model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.int8


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_decoding_of_a_quantized_model_matches_its_full_forward(tiny_gpt, scheme):
    # One token at a time runs other kernels than a whole sequence (weight-only: packed kernel vs bf16 matmul),
    # and dynamic int8 scales its activations over the rows of each call (2 here, 60 in the full forward): the
    # cached path must be as near the float model as the full forward is, and near the full forward itself.
    float_model = tiny_gpt()
    model = quantized_copy(float_model, scheme)
    x = tokens(2, 30)  # 60 rows for the full forward, 2 a step
    with torch.no_grad():
        reference = float_model(x)
        full = model(x)
        logits, cache = model(x[:, :1], use_cache=True)
        steps = [logits]
        for t in range(1, x.shape[1]):
            logits, cache = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(logits)
    cached = torch.cat(steps, dim=1)
    assert relative_error(cached, reference) < TOLERANCE[scheme]
    same_kernels_bound = TOLERANCE[scheme] if scheme == "int8" else TOLERANCE[scheme] / 2
    assert relative_error(cached, full) < same_kernels_bound


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_gives_a_plain_float_gpt_with_the_quantized_weights(tiny_gpt, tiny_tokenizer_path, tmp_path, scheme):
    model = tiny_gpt()
    quantized = quantized_copy(model, scheme)
    plain = dequantize(quantized)
    assert type(plain) is GPT and not getattr(plain, "quantization", None)
    assert all(p.dtype == torch.float32 and not p.is_meta for p in plain.parameters())
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    x = tokens(2, 10)
    with torch.no_grad():
        assert relative_error(plain(x), quantized(x)) < 0.02  # only the activations' rounding differs
        assert not torch.equal(plain(x), model(x))  # the weights' rounding is kept
    save(plain, tmp_path / "plain", tiny_tokenizer_path)
    assert "quantization" not in json.loads((tmp_path / "plain" / "config.json").read_text())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_widths_the_kernels_cannot_take_are_padded(tiny_gpt, scheme):
    # Pruned to 89 MLP channels: odd, not a multiple of 8 (int8 packed kernel) nor of 16/32 (int4 kernel).
    model = prune_structured(tiny_gpt(d_model=48, n_head=3), 39 / 128)
    assert model.config.d_ff == 89
    x = tokens(3, 12)  # 36 rows: past the int8 packed kernel's limit; one row below it
    with torch.no_grad():
        ref = model(x)
        quantized = quantized_copy(model, scheme)
        assert relative_error(quantized(x), ref) < TOLERANCE[scheme]
        assert relative_error(quantized(x[:1, :1]), ref[:1, :1]) < TOLERANCE[scheme]
    assert dequantize(quantized).model.layers[0].mlp.down_proj.weight.shape == (48, 89)


def test_quantize_refuses_an_unknown_scheme_and_a_quantized_model(tiny_gpt):
    with pytest.raises(LlmctlError, match="unknown quantization scheme 'int3'; choose one of int8, int8-weight, int4"):
        quantize_model(tiny_gpt(), "int3")
    with pytest.raises(LlmctlError, match=r"already quantized \(int8\)"):
        quantize_model(quantized_copy(tiny_gpt(), "int8"), "int8-weight")


def test_int4_says_why_when_the_torch_build_has_no_cpu_kernel(tiny_gpt, monkeypatch):
    monkeypatch.setattr(quantization, "int4_kernel_problem", lambda: "torch 9.9 has no working CPU int4 matmul (x)")
    with pytest.raises(LlmctlError, match=r"cannot quantize to int4-weight: torch 9.9 has no working CPU int4 matmul"):
        quantize_model(tiny_gpt(), "int4-weight")


# --- bad quantized model dirs -----------------------------------------------------------------------


@pytest.fixture
def int8_dir(tiny_gpt, tiny_tokenizer_path, tmp_path):
    path = tmp_path / "q"
    save(quantized_copy(tiny_gpt(), "int8"), path, tiny_tokenizer_path)
    return path


def rewrite_tensors(path, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].float()}),
     r"tensor 'model.layers.0.mlp.up_proj.weight' is float32 \(128, 32\), expected int8 \(128, 32\)"),
    (lambda t: t.pop("model.layers.1.self_attn.v_proj.weight_scale"),
     r"missing tensor 'model.layers.1.self_attn.v_proj.weight_scale'"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"][:16]}),
     r"expected int8 \(32, 32\)"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), r"unexpected tensors \['extra.weight'\]"),
    (lambda t: t.pop("model.norm.weight"), r"missing tensors \['model.norm.weight'\]"),
])
def test_load_refuses_quantized_weights_that_do_not_match_the_config(int8_dir, change, message):
    rewrite_tensors(int8_dir, change)
    with pytest.raises(LlmctlError, match=message) as info:
        load_model_dir(int8_dir)
    assert str(int8_dir / "model.safetensors") in info.value.message


def test_load_refuses_an_unknown_quantization_scheme(int8_dir):
    config = json.loads((int8_dir / "config.json").read_text())
    (int8_dir / "config.json").write_text(json.dumps({**config, "quantization": {"scheme": "int3"}}))
    with pytest.raises(LlmctlError, match=r"config\.json: quantization scheme 'int3' is not one this llmctl runs"):
        load_model_dir(int8_dir)


def test_load_refuses_float_weights_under_a_quantized_config(tiny_gpt, tiny_tokenizer_path, tmp_path, int8_dir):
    save(tiny_gpt(), tmp_path / "fp32", tiny_tokenizer_path)
    (tmp_path / "fp32" / "config.json").write_bytes((int8_dir / "config.json").read_bytes())
    with pytest.raises(LlmctlError, match=r"weights do not match config\.json's quantization \(tensor "):
        load_model_dir(tmp_path / "fp32")


def test_load_refuses_to_put_a_quantized_model_on_another_device(int8_dir):
    with pytest.raises(LlmctlError, match=r"runs on CPU only, not cuda"):
        load_model_dir(int8_dir, device="cuda")


def test_compress_refuses_to_quantize_a_model_with_attention_biases(tmp_path, tiny_tokenizer_path) -> None:
    from llmctl.compression.pipeline import compress_model
    from llmctl.config.schema import CompressConfig
    from llmctl.models.registry import build_model
    from tests.conftest import TINY_MODEL

    save(build_model({**TINY_MODEL, "attention_bias": True}), tmp_path / "biased", tiny_tokenizer_path)
    with pytest.raises(LlmctlError, match="q/k/v biases"):
        compress_model(tmp_path / "biased", tmp_path / "out", CompressConfig(quantize="int8"))
    assert not (tmp_path / "out").exists()
