"""LoRA: adapters on the gpt family's linear layers, frozen base, adapter-only optimizer state and
checkpoints, merged weights equal to the base-plus-adapter forward, and the recipe checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmctl.config import load_recipe
from llmctl.config.schema import LoraConfig, TrainConfig, unknown_recipe_key
from llmctl.errors import EXIT_BAD_INPUT, LlmctlError
from llmctl.models.gpt import GPT, GPTConfig
from llmctl.training.lora import LoRALinear, apply_lora, base_fingerprint, is_adapter_key, merged_state_dict
from llmctl.training.optim import build_optimizer
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(seed: int = 0, batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, TINY_MODEL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def adapted(tiny_gpt, **lora) -> tuple[GPT, list[str]]:
    model = tiny_gpt()
    names = apply_lora(model, LoraConfig(**{"rank": 4, "alpha": 8, **lora}))
    return model, names


def train_steps(model: GPT, steps: int = 5, lr: float = 1e-2) -> None:
    """A few AdamW steps of next-token loss on random tokens, so every B moves off zero."""
    optimizer = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0))
    model.train()
    for step in range(steps):
        x = tokens(step)
        logits = model(x[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def test_adapters_start_at_zero_so_the_adapted_model_is_the_base_model(tiny_gpt) -> None:
    base = tiny_gpt()
    model, names = adapted(tiny_gpt, targets=ALL)
    assert len(names) == 7 * TINY_MODEL["n_layer"]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_only_adapter_parameters_train(tiny_gpt) -> None:
    model, names = adapted(tiny_gpt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{ab}" for layer in names for ab in ("lora_A", "lora_B")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, steps=2)
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"{n} changed"
        assert params[n].grad is None
    assert all(float(params[f"{layer}.lora_B"].detach().abs().max()) > 0 for layer in names)


def test_an_optimizer_step_keeps_state_for_the_adapters_alone(tiny_gpt) -> None:
    model, names = adapted(tiny_gpt, targets=["v_proj"])
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    x = tokens()
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert {id(p) for p in optimizer.state} == {id(params[f"{n}.{ab}"]) for n in names for ab in ("lora_A", "lora_B")}


def test_merged_weights_give_the_logits_of_the_base_plus_adapter_forward(tiny_gpt) -> None:
    model, _ = adapted(tiny_gpt, targets=ALL, dropout=0.1)
    train_steps(model)
    merged = GPT(GPTConfig(**TINY_MODEL)).eval()
    merged.load_state_dict(merged_state_dict(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    x = tokens(seed=99, length=TINY_MODEL["context_length"])
    with torch.no_grad():
        unmerged, plain = model(x), merged(x)
        base = tiny_gpt()(x)
    assert (unmerged - plain).abs().max() < 1e-5
    assert (unmerged - base).abs().max() > 1e-3  # the adapters did change the model


def test_a_merged_model_dir_loads_as_a_plain_model_with_the_same_logits(tiny_gpt, tmp_path: Path, tiny_tokenizer_path: Path) -> None:
    from llmctl.models.model_dir import load_model_dir, save_model_dir

    model, _ = adapted(tiny_gpt, targets=["q_proj", "v_proj", "down_proj"])
    train_steps(model)
    save_model_dir(model, tmp_path / "m", tokenizer_path=tiny_tokenizer_path, provenance={}, state_dict=merged_state_dict(model))
    loaded = load_model_dir(tmp_path / "m")
    assert type(loaded.model) is GPT and not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    x = tokens(seed=5)
    with torch.no_grad():
        assert (loaded.model(x) - model(x)).abs().max() < 1e-5


def test_dropout_acts_on_the_adapter_input_only(tiny_gpt) -> None:
    base = tiny_gpt()
    model, _ = adapted(tiny_gpt, targets=["q_proj"], dropout=0.9)
    model.train()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # B is zero: whatever dropout does to the adapter's input
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
        assert not torch.equal(model(x), model(x))  # now the adapter path is noisy in training ...
        model.eval()
        assert torch.equal(model(x), model(x))  # ... and not in eval


def test_a_target_matching_no_linear_layer_is_refused_naming_it_and_listing_the_layers(tiny_gpt) -> None:
    for target, hint in (("qproj", "did you mean q_proj?"), ("mlp", "")):
        with pytest.raises(LlmctlError) as info:
            adapted(tiny_gpt, targets=["v_proj", target])
        message = info.value.message
        assert info.value.exit_code == EXIT_BAD_INPUT
        assert f"train.lora.targets: {target!r} matches no linear layer" in message and hint in message
        assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message


def test_a_target_may_be_a_dotted_suffix_naming_one_layer(tiny_gpt) -> None:
    _, names = adapted(tiny_gpt, targets=["layers.1.self_attn.q_proj", "1.mlp.down_proj"])
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_the_tied_output_head_is_refused_but_an_untied_one_is_adapted(tiny_gpt) -> None:
    with pytest.raises(LlmctlError, match="lm_head shares its weight with the token embedding"):
        adapted(tiny_gpt, targets=["lm_head"])
    model = tiny_gpt(tie_embeddings=False)
    assert apply_lora(model, LoraConfig(targets=["lm_head"])) == ["lm_head"]


def test_the_base_fingerprint_ignores_adapters_and_sees_other_base_weights(tiny_gpt) -> None:
    base = tiny_gpt()
    model, _ = adapted(tiny_gpt)
    train_steps(model, steps=1)
    assert base_fingerprint(model) == base_fingerprint(base)
    assert base_fingerprint(tiny_gpt(seed=1)) != base_fingerprint(base)


def test_a_checkpoint_holds_the_adapters_alone_and_refuses_other_adapters(tiny_gpt, tmp_path: Path) -> None:
    from accelerate import Accelerator
    from safetensors import safe_open

    from llmctl.artifacts import RunDir
    from llmctl.training.checkpoints import keep_adapters_only, load_checkpoint, save_checkpoint

    def prepared(targets: list[str]) -> tuple[Accelerator, GPT, set[str]]:
        accelerator = Accelerator(cpu=True)
        model, _ = adapted(tiny_gpt, targets=targets)
        model, optimizer = accelerator.prepare(model, build_optimizer(model, TrainConfig()))
        keep_adapters_only(accelerator)
        return accelerator, model, {k for k in model.state_dict() if is_adapter_key(k)}

    accelerator, model, keys = prepared(["q_proj", "v_proj"])
    train_steps(model, steps=1)
    path = save_checkpoint(accelerator, RunDir(tmp_path / "run"), 1, {"tokens": 0}, keep=2)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == keys and len(keys) == 2 * 2 * TINY_MODEL["n_layer"]  # A and B of 2 targets per layer
    whole = (path / "model.safetensors").stat().st_size
    assert whole < 0.1 * sum(p.numel() * 4 for p in model.parameters())

    accelerator, other, other_keys = prepared(["q_proj", "o_proj"])
    with pytest.raises(LlmctlError, match=r"adapters on 4 layers \(q_proj, v_proj\), but train.lora.targets puts them on 4 \(o_proj, q_proj\)"):
        load_checkpoint(accelerator, path, other_keys)
    with pytest.raises(LlmctlError, match="holds LoRA adapters only, but the recipe has no train.lora"):
        load_checkpoint(accelerator, path, None)
    accelerator, again, again_keys = prepared(["q_proj", "v_proj"])
    assert load_checkpoint(accelerator, path, again_keys)["step"] == 1
    trained = dict(model.named_parameters())
    for name, p in again.named_parameters():
        if is_adapter_key(name):
            assert torch.equal(p, trained[name])


# --- the recipe ----------------------------------------------------------------------------------------


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)

    def make(text: str) -> Path:
        (tmp_path / "r.yaml").write_text(text, encoding="utf-8")
        return tmp_path / "r.yaml"

    return make


def test_lora_is_set_whole_or_key_by_key_on_the_command_line(write) -> None:
    path = write("train: {max_steps: 5}\n")
    assert load_recipe(path).train.lora is None
    lora = load_recipe(path, ["train.lora.rank=4", "train.lora.targets=[o_proj]"]).train.lora
    assert (lora.rank, lora.alpha, lora.targets) == (4, 16.0, ["o_proj"])
    lora = load_recipe(path, ["train.lora={rank: 2, alpha: 4, dropout: 0.1}"]).train.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (2, 4.0, 0.1, ["q_proj", "v_proj"])
    assert unknown_recipe_key("train.lora.rank") is None
    assert "did you mean train.lora.rank" in unknown_recipe_key("train.lora.rnk")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("data: {task: classification}\ntrain: {lora: {rank: 4}}\n", "train.lora adapts the gpt language model"),
        ("train: {lora: {rank: 4}, keep_sparsity: true}\n", "merging the adapters would fill the zeros"),
        ("train: {lora: {rank: 4}, strategy: fsdp}\n", "train.lora works with train.strategy: ddp"),
        ("train: {lora: {rank: 0}}\n", "train.lora.rank: must be >= 1"),
        ("train: {lora: {targets: []}}\n", "needs at least one layer name"),
        ("train: {lora: {rnk: 4}}\n", "did you mean train.lora.rank?"),
        ("data: {chat_template: 'x'}\n", "data.chat_template renders instruction data: it needs data.task: instruct"),
    ],
)
def test_recipe_checks_name_what_to_change(write, text: str, needle: str) -> None:
    with pytest.raises(LlmctlError) as info:
        load_recipe(write(text))
    assert needle in info.value.message and info.value.exit_code == EXIT_BAD_INPUT
