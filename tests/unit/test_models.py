"""The gpt family: shapes, causality, KV cache, masks, HF names, rotary, sampling, registry, model dirs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmctl.errors import LlmctlError
from llmctl.models import build_model, get_family, register_family
from llmctl.models import registry
from llmctl.models.generation import SamplingParams, generate, sample_next
from llmctl.models.gpt import GPT, GPTConfig, apply_rotary, rotary_cos_sin
from llmctl.models.model_dir import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T_MAX = 300, 32  # the tiny model's vocab_size and context_length (see conftest.TINY_MODEL)


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# --- forward ---------------------------------------------------------------------------------------


def test_logits_have_shape_batch_time_vocab(tiny_gpt):
    model = tiny_gpt()
    assert model(tokens(3, 7)).shape == (3, 7, V)
    logits, cache = model(tokens(2, 5), use_cache=True)
    assert logits.shape == (2, 5, V)
    assert len(cache) == 2  # one (k, v) per layer
    k, v = cache[0]
    assert k.shape == v.shape == (2, 2, 5, 16)  # (B, n_kv_head, T, head_size)


def test_grouped_query_cache_holds_only_the_kv_heads(tiny_gpt):
    model = tiny_gpt(n_head=4, n_kv_head=2)
    _, cache = model(tokens(1, 6), use_cache=True)
    assert cache[0][0].shape == (1, 2, 6, 8)  # (B, n_kv_head, T, d_model / n_head)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)


def test_changing_a_future_token_leaves_earlier_logits_unchanged(tiny_gpt):
    model = tiny_gpt()
    x = tokens(2, 12)
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4  # and the changed position does see it


@pytest.mark.parametrize("n_kv_head", [None, 1], ids=["mha", "gqa"])
def test_cached_forward_one_token_at_a_time_equals_the_full_forward(tiny_gpt, n_kv_head):
    model = tiny_gpt(n_head=4, n_kv_head=n_kv_head)
    x = tokens(2, 14)
    with torch.no_grad():
        full = model(x)
        logits, cache = model(x[:, :5], use_cache=True)
        pieces = [logits]
        for t in range(5, 14):
            logits, cache = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    assert cache[0][0].shape[2] == 14


def test_cached_forward_of_a_chunk_after_a_prefix_equals_the_full_forward(tiny_gpt):
    model = tiny_gpt(n_head=4, n_kv_head=2)
    x = tokens(1, 20)
    with torch.no_grad():
        full = model(x)
        first, cache = model(x[:, :7], use_cache=True)
        rest, _ = model(x[:, 7:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=0, atol=1e-5)


def test_right_padding_with_attention_mask_leaves_real_tokens_as_unpadded(tiny_gpt):
    model = tiny_gpt()
    x = tokens(1, 10)
    batch = torch.stack([torch.cat([x[0, :6], torch.zeros(4, dtype=torch.long)]), x[0]])  # (2, 10)
    mask = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0, :6], model(x[:, :6])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1], model(x)[0], rtol=0, atol=1e-5)


def test_left_padding_with_mask_and_positions_matches_the_unpadded_sequence(tiny_gpt):
    model = tiny_gpt()
    x = tokens(1, 9)
    padded = torch.cat([torch.full((1, 3), 7), x], dim=1)  # (1, 12)
    mask = torch.tensor([[0] * 3 + [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=positions)
        ref = model(x)
        # Without the mask the real tokens would attend to the pads and differ.
        unmasked = model(padded, position_ids=positions)
    assert not out.isnan().any()
    torch.testing.assert_close(out[:, 3:], ref, rtol=0, atol=1e-5)
    assert (unmasked[:, 3:] - ref).abs().max() > 1e-4


def test_tied_embeddings_share_storage_and_untied_do_not(tiny_gpt):
    tied, untied = tiny_gpt(tie_embeddings=True), tiny_gpt(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == V * 32


def test_parameter_names_match_hf_llama():
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, context_length=T_MAX, tie_embeddings=False))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        layer = f"model.layers.{i}"
        expected |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        expected |= {f"{layer}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert set(model.state_dict()) == expected
    assert {name for name, _ in model.named_parameters()} == expected  # no biases, nothing else


def test_tied_model_state_dict_still_has_the_hf_lm_head_name(tiny_gpt):
    assert "lm_head.weight" in tiny_gpt(tie_embeddings=True).state_dict()


def test_default_d_ff_follows_llamas_rule():
    assert GPTConfig(vocab_size=V, d_model=32).d_ff == 128  # 8/3*32 = 85 -> 128
    assert GPTConfig(vocab_size=V, d_model=768).d_ff == 2048
    assert GPTConfig(vocab_size=V, n_head=4).n_kv_head == 4


def test_config_round_trips_through_a_dict_naming_its_family():
    cfg = GPTConfig(vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, d_model=64, tie_embeddings=False)
    d = cfg.to_dict()
    assert d["family"] == "gpt"
    assert GPTConfig.from_dict({**d, "unrelated": 1}) == cfg


# --- rotary ----------------------------------------------------------------------------------------


def reference_rotary(x: torch.Tensor, positions: list[int], theta: float) -> torch.Tensor:
    """Rotate-half rotary: pair dim i with i + hs/2, angle pos * theta^(-2i/hs)."""
    hs = x.shape[-1]
    half = hs // 2
    out = torch.empty_like(x)
    for t, pos in enumerate(positions):
        for i in range(half):
            angle = pos * theta ** (-2 * i / hs)
            c, s = math.cos(angle), math.sin(angle)
            x1, x2 = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = x1 * c - x2 * s
            out[..., t, i + half] = x1 * s + x2 * c
    return out


def test_apply_rotary_rotates_halves_like_hf_llama():
    hs, positions = 8, [0, 1, 5, 17]
    x = torch.randn(2, 3, len(positions), hs, generator=torch.Generator().manual_seed(0))  # (B, nh, T, hs)
    cos, sin = rotary_cos_sin(torch.tensor([positions, positions]), hs, 10000.0)
    assert cos.shape == sin.shape == (2, 1, len(positions), hs)
    torch.testing.assert_close(apply_rotary(x, cos, sin), reference_rotary(x, positions, 10000.0), rtol=0, atol=1e-5)


def test_rotary_at_position_zero_is_identity_and_keeps_norms():
    x = torch.randn(1, 1, 3, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary_cos_sin(torch.tensor([[0, 3, 9]]), 16, 500.0)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(pq: int, pk: int) -> float:
        cos, sin = rotary_cos_sin(torch.tensor([[pq, pk]]), 16, 10000.0)
        both = torch.stack([q, k])[None, None]  # (1, 1, 2, hs)
        r = apply_rotary(both, cos, sin)[0, 0]
        return float(r[0] @ r[1])

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)


# --- generation ------------------------------------------------------------------------------------


def greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by a full forward per token, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_generation_with_the_cache_equals_decoding_without_it(tiny_gpt):
    model = tiny_gpt()
    prompt = [5, 17, 42, 99, 3]
    out = generate(model, prompt, SamplingParams(max_new_tokens=20, temperature=0))
    assert out == greedy_reference(model, prompt, 20)


def test_greedy_generation_is_deterministic(tiny_gpt):
    model = tiny_gpt()
    params = SamplingParams(max_new_tokens=15, temperature=0)
    assert generate(model, [1, 2, 3], params) == generate(model, [1, 2, 3], params)


def test_same_seed_gives_the_same_sample_and_other_seeds_differ(tiny_gpt):
    model = tiny_gpt()
    run = lambda seed: generate(model, [1, 2, 3], SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed))
    a = run(0)
    assert len(a) == 20
    assert run(0) == a
    assert run(1) != a or run(2) != a


def test_top_k_1_equals_greedy(tiny_gpt):
    model = tiny_gpt()
    greedy = generate(model, [9, 8, 7], SamplingParams(max_new_tokens=12, temperature=0))
    assert generate(model, [9, 8, 7], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)) == greedy


def test_tiny_top_p_equals_greedy(tiny_gpt):
    model = tiny_gpt()
    greedy = generate(model, [9, 8, 7], SamplingParams(max_new_tokens=12, temperature=0))
    assert generate(model, [9, 8, 7], SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=4)) == greedy


def test_top_k_samples_only_among_the_k_largest_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9, -2.0]]).repeat(200, 1)  # (200, 5)
    picked = sample_next(logits, SamplingParams(temperature=5.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {1, 3}


def test_stop_id_ends_generation_and_is_not_returned(tiny_gpt):
    model = tiny_gpt()
    free = generate(model, [1, 2, 3], SamplingParams(max_new_tokens=20, temperature=0))
    stop = free[4]
    stopped = generate(model, [1, 2, 3], SamplingParams(max_new_tokens=20, temperature=0, stop_ids=[stop]))
    assert stopped == free[: free.index(stop)]
    assert stop not in stopped


def test_generation_longer_than_the_context_length_keeps_going(tiny_gpt):
    model = tiny_gpt()
    prompt = tokens(1, 40, seed=5)[0].tolist()  # longer than the context too
    out = generate(model, prompt, SamplingParams(max_new_tokens=3 * T_MAX, temperature=0))
    assert len(out) == 3 * T_MAX
    assert all(0 <= t < V for t in out)
    assert out == generate(model, prompt, SamplingParams(max_new_tokens=3 * T_MAX, temperature=0))
    # Up to the first re-encode the cache is exact: it matches decoding the last T_MAX prompt tokens afresh.
    assert out[:1] == greedy_reference(model, prompt[-T_MAX:], 1)


def test_empty_prompt_starts_from_the_first_stop_token_or_id_0(tiny_gpt):
    model = tiny_gpt()
    with_stop = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=[299, 5])
    assert generate(model, [], with_stop) == generate(model, [299], with_stop)
    plain = SamplingParams(max_new_tokens=6, temperature=0)
    assert generate(model, [], plain) == generate(model, [0], plain)
    assert len(generate(model, [], plain)) == 6


# --- registry --------------------------------------------------------------------------------------


def test_unknown_family_names_the_known_ones():
    with pytest.raises(LlmctlError, match=r"unknown model family 'mamba'; known families: .*gpt"):
        build_model({"family": "mamba", "vocab_size": V})
    with pytest.raises(LlmctlError, match="unknown model family"):
        get_family("mamba")


def test_build_model_defaults_to_gpt_and_ignores_recipe_only_keys():
    model = build_model({"vocab_size": V, "n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 16})
    assert isinstance(model, GPT) and model.context_length == 16 and len(model.model.layers) == 1


def test_a_registered_family_is_built_by_name(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    register_family("toy", "llmctl.models.gpt", "build_gpt")
    model = build_model({"family": "toy", "vocab_size": 50, "n_layer": 1, "n_head": 2, "d_model": 16})
    assert isinstance(model, GPT) and model.config.vocab_size == 50


# --- model dirs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_then_load_model_dir_gives_identical_logits(tiny_gpt, tiny_tokenizer_path, tmp_path, tie):
    model = tiny_gpt(tie_embeddings=tie, n_head=4, n_kv_head=2)
    dest = tmp_path / "model"
    save_model_dir(model, dest, tokenizer_path=tiny_tokenizer_path, provenance={"step": 7})
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "llmctl.json", "model.safetensors", "tokenizer.json"]
    loaded = load_model_dir(dest)
    x = tokens(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) is tie
    assert loaded.config["tie_embeddings"] is tie and loaded.config["n_kv_head"] == 2
    assert loaded.provenance["step"] == 7
    assert loaded.tokenizer.encode("def x").ids == load_tokenizer_ids(tiny_tokenizer_path, "def x")
    assert not loaded.model.training


def load_tokenizer_ids(path: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).encode(text).ids


def test_save_model_dir_replaces_an_existing_dir_whole(tiny_gpt, tiny_tokenizer_path, tmp_path):
    dest = tmp_path / "model"
    save_model_dir(tiny_gpt(seed=0), dest, tokenizer_path=tiny_tokenizer_path, provenance={})
    (dest / "stale.txt").write_text("old")
    save_model_dir(tiny_gpt(seed=1), dest, tokenizer_path=tiny_tokenizer_path, provenance={})
    assert not (dest / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging dirs left
    x = tokens(1, 5)
    with torch.no_grad():
        assert torch.equal(load_model_dir(dest).model(x), tiny_gpt(seed=1)(x))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_load_model_dir_refuses_a_dir_missing_a_file(tiny_gpt, tiny_tokenizer_path, tmp_path, missing):
    dest = tmp_path / "model"
    save_model_dir(tiny_gpt(), dest, tokenizer_path=tiny_tokenizer_path, provenance={})
    (dest / missing).unlink()
    with pytest.raises(LlmctlError, match=rf"not a model dir \(missing {missing}\)") as info:
        load_model_dir(dest)
    assert str(dest) in info.value.message


def test_load_model_dir_refuses_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(LlmctlError, match="no such model dir"):
        load_model_dir(tmp_path / "nowhere")


def test_load_model_dir_refuses_a_tokenizer_larger_than_the_vocabulary(tiny_gpt, tiny_tokenizer_path, tmp_path):
    dest = tmp_path / "model"
    save_model_dir(tiny_gpt(vocab_size=100), dest, tokenizer_path=tiny_tokenizer_path, provenance={})
    with pytest.raises(LlmctlError) as info:
        load_model_dir(dest)
    message = info.value.message
    assert "tokenizer.json has" in message and "vocab_size is 100" in message
    assert "tokenizer does not belong to this model" in message


def test_load_model_dir_refuses_weights_that_do_not_match_the_config(tiny_gpt, tiny_tokenizer_path, tmp_path):
    dest = tmp_path / "model"
    save_model_dir(tiny_gpt(), dest, tokenizer_path=tiny_tokenizer_path, provenance={})
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(LlmctlError, match=r"weights do not match config\.json"):
        load_model_dir(dest)


def test_load_model_dir_refuses_an_unreadable_tokenizer(tiny_gpt, tiny_tokenizer_path, tmp_path):
    dest = tmp_path / "model"
    save_model_dir(tiny_gpt(), dest, tokenizer_path=tiny_tokenizer_path, provenance={})
    (dest / "tokenizer.json").write_text("{broken")
    with pytest.raises(LlmctlError, match=r"tokenizer\.json: not a readable tokenizer"):
        load_model_dir(dest)
