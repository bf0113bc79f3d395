"""Pruning: magnitude sparsity (global and per layer), structured head/channel removal, model dirs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from llmctl.compression.pruning import prune_structured, prune_unstructured, sparsity
from llmctl.errors import LlmctlError
from llmctl.models.model_dir import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 300  # the tiny model's vocab_size (see conftest.TINY_MODEL)


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def decoder_linears(model) -> list[nn.Linear]:
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]


def zeros(weights) -> int:
    return sum(int((w == 0).sum()) for w in weights)


# --- unstructured -----------------------------------------------------------------------------------


def test_global_pruning_zeroes_the_target_share_of_decoder_weights_only(tiny_gpt):
    model = tiny_gpt()
    embed = model.model.embed_tokens.weight.detach().clone()
    stats = prune_unstructured(model, 0.5, scope="global")
    linears = decoder_linears(model)
    prunable = sum(m.weight.numel() for m in linears)
    assert stats == {"scope": "global", "target_sparsity": 0.5, "pruned_weights": round(0.5 * prunable),
                     "prunable_weights": prunable}
    assert zeros(m.weight for m in linears) == stats["pruned_weights"]
    assert torch.equal(model.model.embed_tokens.weight, embed)  # embeddings (and the tied head) untouched
    assert all(torch.all(layer.input_layernorm.weight == 1) for layer in model.model.layers)


def test_layer_pruning_gives_every_weight_matrix_the_same_sparsity(tiny_gpt):
    model = tiny_gpt()
    for m in decoder_linears(model)[:3]:
        m.weight.data *= 0.01  # a global threshold would take these first
    prune_unstructured(model, 0.4, scope="layer")
    for m in decoder_linears(model):
        assert zeros([m.weight]) == round(0.4 * m.weight.numel())


def test_global_pruning_takes_most_from_the_matrix_with_the_smallest_weights(tiny_gpt):
    model = tiny_gpt()
    small = model.model.layers[1].mlp.up_proj
    small.weight.data *= 0.01
    prune_unstructured(model, 0.3, scope="global")
    assert zeros([small.weight]) == small.weight.numel()  # all of it, well above 30%
    assert zeros([model.model.layers[0].mlp.up_proj.weight]) < 0.3 * small.weight.numel()


def test_pruned_zeros_are_plain_weights_that_survive_save_and_load(tiny_gpt, tiny_tokenizer_path, tmp_path):
    model = tiny_gpt()
    keys = set(model.state_dict())
    prune_unstructured(model, 0.6)
    assert set(model.state_dict()) == keys  # no weight_orig / weight_mask left behind
    save_model_dir(model, tmp_path / "model", tokenizer_path=tiny_tokenizer_path, provenance={})
    loaded = load_model_dir(tmp_path / "model").model
    assert zeros(m.weight for m in decoder_linears(loaded)) == zeros(m.weight for m in decoder_linears(model))
    assert sparsity(loaded) == sparsity(model)


def test_sparsity_counts_a_tied_weight_once(tiny_gpt):
    model = tiny_gpt(tie_embeddings=True)
    total, nonzero = sparsity(model)
    stored = model.state_dict()
    assert total == sum(p.numel() for name, p in stored.items() if name != "lm_head.weight")
    assert nonzero == total
    model.model.embed_tokens.weight.data[0] = 0
    assert sparsity(model) == (total, total - model.config.d_model)


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
    ({"sparsity": 0.5, "scope": "row"}, r"unknown pruning scope 'row'; choose one of global, layer"),
])
def test_unstructured_pruning_refuses_bad_arguments(tiny_gpt, kwargs, message):
    with pytest.raises(LlmctlError, match=message):
        prune_unstructured(tiny_gpt(), **kwargs)


# --- structured -------------------------------------------------------------------------------------


def gqa_model(tiny_gpt, **config):
    return tiny_gpt(**{"n_head": 4, "n_kv_head": 2, "d_model": 32, **config})  # head size 8, d_ff 128


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of `original` each row of `pruned` is (weights are copied, so rows match exactly)."""
    return [int(torch.nonzero((original == row).all(dim=1))[0]) for row in pruned]


def test_structured_pruning_equals_masking_the_removed_heads_and_channels(tiny_gpt):
    model = gqa_model(tiny_gpt)
    small = prune_structured(model, 0.5)
    cfg = small.config
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff) == (2, 1, 8, 64)
    assert small.num_parameters() < model.num_parameters()

    masked = copy.deepcopy(model)
    for big, little in zip(masked.model.layers, small.model.layers):
        q_kept = set(kept_rows(big.self_attn.q_proj.weight, little.self_attn.q_proj.weight))
        assert len(q_kept) == 16  # one KV group = 2 query heads of 8 rows
        for row in set(range(32)) - q_kept:
            big.self_attn.o_proj.weight.data[:, row] = 0  # the removed heads write nothing
        c_kept = set(kept_rows(big.mlp.gate_proj.weight, little.mlp.gate_proj.weight))
        for c in set(range(128)) - c_kept:
            big.mlp.down_proj.weight.data[:, c] = 0
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), atol=1e-5, rtol=0)
        assert not torch.allclose(small(x), model(x), atol=1e-4)  # something was removed


def test_structured_pruned_model_round_trips_through_a_model_dir(tiny_gpt, tiny_tokenizer_path, tmp_path):
    small = prune_structured(gqa_model(tiny_gpt), 0.5)
    save_model_dir(small, tmp_path / "model", tokenizer_path=tiny_tokenizer_path, provenance={})
    loaded = load_model_dir(tmp_path / "model")
    assert [loaded.config[k] for k in ("n_head", "n_kv_head", "head_dim", "d_ff")] == [2, 1, 8, 64]
    x = tokens(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), small(x))


def test_structured_pruning_keeps_at_least_one_head_group_and_one_channel(tiny_gpt):
    small = prune_structured(gqa_model(tiny_gpt), 0.99)
    assert (small.config.n_kv_head, small.config.n_head, small.config.d_ff) == (1, 2, 1)
    assert small(tokens(1, 4)).shape == (1, 4, V)


def test_calibration_removes_a_head_and_a_channel_that_weights_call_important(tiny_gpt):
    """Layer 0's group 0 and MLP channel 0 read only residual dimension 0, which its norms zero:
    large weights, no effect. Magnitude keeps them; the activation-aware score drops them."""
    model = gqa_model(tiny_gpt)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight[0] = 0
        layer.post_attention_layernorm.weight[0] = 0
        layer.self_attn.v_proj.weight[:8] = 0
        layer.self_attn.v_proj.weight[:8, 0] = torch.arange(1.0, 9.0)  # KV head 0 reads only dimension 0
        layer.mlp.gate_proj.weight[0] = 0
        layer.mlp.up_proj.weight[0] = 0
        layer.mlp.gate_proj.weight[0, 0] = layer.mlp.up_proj.weight[0, 0] = 5.0
    v = layer.self_attn.v_proj.weight

    by_weights = prune_structured(model, 0.5).model.layers[0]
    by_activations = prune_structured(model, 0.5, calibration=tokens(4, 16)).model.layers[0]
    assert kept_rows(v, by_weights.self_attn.v_proj.weight) == list(range(8))  # group 0 kept
    assert kept_rows(v, by_activations.self_attn.v_proj.weight) == list(range(8, 16))  # group 0 dropped
    gate = layer.mlp.gate_proj.weight
    assert 0 in kept_rows(gate, by_weights.mlp.gate_proj.weight)
    assert 0 not in kept_rows(gate, by_activations.mlp.gate_proj.weight)


def test_structured_pruning_leaves_the_original_model_unchanged(tiny_gpt):
    model = gqa_model(tiny_gpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_structured(model, 0.5, calibration=tokens(2, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.parametrize("calibration, message", [
    (torch.zeros(4, dtype=torch.long), r"shape \(batch, tokens\)"),
    (torch.zeros(2, 4), r"integer tensor"),
    (torch.full((1, 4), V), r"token ids must be in \[0, 300\)"),
    (torch.zeros(1, 33, dtype=torch.long), r"33 tokens, more than the model's context length 32"),
])
def test_structured_pruning_refuses_bad_calibration(tiny_gpt, calibration, message):
    with pytest.raises(LlmctlError, match=message):
        prune_structured(tiny_gpt(), 0.5, calibration=calibration)
