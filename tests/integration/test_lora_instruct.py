"""Instruction tuning with LoRA through the real CLI, on top of a tiny llmctl base model trained once
for the module: prepare from JSONL of both formats, train adapters, then eval, serve's chat endpoint,
compress and export the merged model without any extra flag."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import assert_clean_failure, metrics, run_cli, train_tiny

WORDS = "def return class import self if else for while in not and or None True False print value key data".split()

# A chat template of the base model (as if it were a chat model): the fine-tune takes it over.
BASE_TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)

INSTRUCT_RECIPE = """\
# instruct + LoRA on the base model
run: {seed: 0}
data:
  task: instruct
  sources: [chat.jsonl, pairs.jsonl]
  tokenizer: base/tokenizer.json
  val_fraction: 0.2
model: {n_layer: 2, n_head: 2, d_model: 32, context_length: 32, init_from: base}
train:
  max_steps: 10
  batch_size: 8
  micro_batch_size: 4
  lr: 1.0e-2
  warmup_steps: 0
  eval_every: 5
  eval_batches: 4
  log_every: 1
  checkpoint_every: 5
  keep_checkpoints: 10
  lora: {rank: 4, alpha: 8, targets: [q_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
"""


def write_instructions(folder: Path, n: int = 48, seed: int = 0) -> None:
    """chat.jsonl (`messages`, some with a system turn) and pairs.jsonl (prompt/response): answer = the prompt reversed."""
    rng = random.Random(seed)
    chat, pairs = [], []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        answer = " ".join(reversed(prompt.split()))
        if i % 2:
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            chat.append({"messages": ([{"role": "system", "content": "reverse"}] if i % 4 == 1 else []) + turns})
        else:
            pairs.append({"prompt": prompt, "response": answer})
    (folder / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in chat), encoding="utf-8")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs), encoding="utf-8")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llmctl base model dir (trained 10 steps on code-like text) that carries a chat template."""
    model = train_tiny(tmp_path_factory.mktemp("base")) / "runs/tiny/model"
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "chat_template": BASE_TEMPLATE}))
    return model


@pytest.fixture
def workdir(tmp_path: Path, base: Path) -> Path:
    shutil.copytree(base, tmp_path / "base")
    write_instructions(tmp_path)
    (tmp_path / "ft.yaml").write_text(INSTRUCT_RECIPE, encoding="utf-8")
    return tmp_path


def _logits_of_base_plus_adapters(workdir: Path, checkpoint: Path, tokens):
    """The unmerged forward: the base model dir, adapters as the recipe puts them, the checkpoint's A and B."""
    from safetensors.torch import load_file

    from llmctl.config import load_recipe
    from llmctl.models.model_dir import load_model_dir
    from llmctl.training.lora import apply_lora

    model = load_model_dir(workdir / "base").model
    apply_lora(model, load_recipe(workdir / "ft.yaml").train.lora)
    adapters = load_file(str(checkpoint / "model.safetensors"))
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert not unexpected and all(not k.endswith(("lora_A", "lora_B")) for k in missing)
    return model.eval()(tokens)


def test_instruct_lora_run_gives_a_merged_model_every_command_uses(workdir: Path) -> None:
    import torch

    prep = json.loads(run_cli(workdir, "prepare", "ft.yaml", "--json").stdout)
    meta = json.loads((workdir / "data/ft/meta.json").read_text())
    assert meta["task"] == "instruct" and meta["formats"] == {"messages": 24, "prompt_response": 24}
    assert meta["chat_template"] == BASE_TEMPLATE and meta["chat_template_source"].startswith("base/config.json")
    assert 0 < meta["splits"]["train"]["response_tokens"] < prep["train_tokens"]

    out = run_cli(workdir, "train", "ft.yaml", "--json")
    result = json.loads(out.stdout)
    assert result["task"] == "instruct" and result["step"] == 10
    assert "LoRA rank 4 (alpha 8) on 12 layers" in out.stderr
    losses = [r["loss"] for r in metrics(workdir / "runs/ft") if "loss" in r]
    assert len(losses) == 10 and min(losses[-3:]) < losses[0]

    # Checkpoints hold the adapters alone (and AdamW's two moments of them), not the frozen base: at this
    # toy width (rank 4 of d_model 32, on 6 of the 7 layer kinds) the adapters are 12% of the base's values.
    from safetensors import safe_open

    provenance = json.loads((workdir / "runs/ft/model/llmctl.json").read_text())
    checkpoint = workdir / f"runs/ft/checkpoints/step-{provenance['step']}"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert f.keys() and all(k.endswith(("lora_A", "lora_B")) for k in f.keys())
    adapter_bytes = 4 * provenance["adapter"]["trainable_parameters"]
    base_bytes = (workdir / "base/model.safetensors").stat().st_size
    assert (checkpoint / "model.safetensors").stat().st_size < adapter_bytes + 4096 < 0.15 * base_bytes
    assert (checkpoint / "optimizer.bin").stat().st_size < 2 * adapter_bytes + 24 * 1024 < 2 * base_bytes

    # The model dir is a plain one with merged weights: its logits are the base-plus-adapter forward's.
    from llmctl.models.model_dir import load_model_dir

    loaded = load_model_dir(workdir / "runs/ft/model")
    x = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(x) - _logits_of_base_plus_adapters(workdir, checkpoint, x)).abs().max() < 1e-5
        assert (loaded.model(x) - load_model_dir(workdir / "base").model(x)).abs().max() > 1e-4
    assert loaded.config["chat_template"] == BASE_TEMPLATE
    record = loaded.provenance["adapter"]
    assert record["method"] == "lora" and record["merged"] and record["rank"] == 4 and record["layers"] == 12
    assert record["base"] == "base" and record["trainable_parameters"] < record["base_parameters"] / 5

    report = json.loads(run_cli(workdir, "eval", "runs/ft/model", "--json").stdout)
    assert report["tokens"] > 0 and report["perplexity"] > 1

    compressed = json.loads(run_cli(workdir, "compress", "runs/ft/model", "--quantize", "int8", "-o", "out/q",
                                    "--no-speed", "--json").stdout)
    assert compressed["after"]["perplexity"] > 1
    assert json.loads((workdir / "out/q/config.json").read_text())["chat_template"] == BASE_TEMPLATE
    export = json.loads(run_cli(workdir, "export", "runs/ft/model", "-o", "out/onnx", "--json").stdout)
    assert export["passed"] is True

    from tests.integration.test_serve import Server
    from tokenizers import Tokenizer

    from llmctl.data.chat_template import ChatTemplate

    messages = [{"role": "user", "content": "def return"}]
    expected = len(Tokenizer.from_file(str(workdir / "base/tokenizer.json")).encode(
        ChatTemplate(BASE_TEMPLATE, source="t").render(messages)).ids)
    server = Server(workdir, "runs/ft/model").wait_ready()
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                           json={"messages": messages, "max_tokens": 4, "temperature": 0}).json()
    finally:
        assert server.terminate() == 0, server.log()
    assert reply["usage"]["prompt_tokens"] == expected  # the prompt was rendered with the stored template
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_a_resumed_lora_run_continues_with_the_losses_of_an_uninterrupted_run(workdir: Path) -> None:
    # Adapter dropout on, so the restored RNG state matters; a constant lr, so stopping the first leg at
    # max_steps=5 is the same as an interruption right after the step-5 checkpoint.
    recipe = INSTRUCT_RECIPE.replace("alpha: 8,", "alpha: 8, dropout: 0.1,") + "  schedule: constant\n"
    (workdir / "ft.yaml").write_text(recipe, encoding="utf-8")
    run_cli(workdir, "train", "ft.yaml", "--run-dir", "runs/whole")
    run_cli(workdir, "train", "ft.yaml", "train.max_steps=5", "--run-dir", "runs/cut")
    refused = run_cli(workdir, "train", "ft.yaml", "--run-dir", "runs/cut", "--resume", "train.lora.targets=[q_proj]", check=False)
    assert_clean_failure(refused, 2, "train.lora", "a resumed run keeps its model shape")
    run_cli(workdir, "train", "ft.yaml", "--run-dir", "runs/cut", "--resume")
    whole, cut = metrics(workdir / "runs/whole"), metrics(workdir / "runs/cut")
    assert [r["step"] for r in cut if "loss" in r] == list(range(1, 11))
    assert [r["loss"] for r in cut if "loss" in r] == [r["loss"] for r in whole if "loss" in r]
    assert [r["val_loss"] for r in cut if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r]


def test_a_lora_target_that_matches_no_layer_exits_2_listing_the_layers(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "ft.yaml", "train.lora.targets=[q_proj, qkv_proj]", check=False)
    assert_clean_failure(proc, 2, "'qkv_proj' matches no linear layer", "q_proj, k_proj, v_proj, o_proj, gate_proj")
    assert not (workdir / "runs/ft").exists()


def test_an_instruct_line_of_neither_format_exits_2_naming_file_and_line(workdir: Path) -> None:
    with open(workdir / "pairs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"question": "q", "answer": "a"}) + "\n")
    lines = (workdir / "pairs.jsonl").read_text().count("\n")
    proc = run_cli(workdir, "prepare", "ft.yaml", check=False)
    assert_clean_failure(proc, 2, f"pairs.jsonl:{lines}: neither messages nor prompt/response (keys: question, answer)")
    assert not (workdir / "data/ft").exists()
