"""Instruction data: JSONL conversations -> chat template -> token shards with a response mask; padded
batches whose loss counts response tokens only; clear errors naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.config.schema import DataConfig, Recipe
from llmctl.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, resolve_chat_template
from llmctl.data.prepare import prepare_dataset
from llmctl.errors import EXIT_BAD_INPUT, LlmctlError
from llmctl.tasks.instruct.data import InstructionData, InstructionSplit, iter_response_runs
from llmctl.tasks.instruct.training import InstructionBatches
from llmctl.tasks.instruct.training import TrainingData as InstructionTask
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOT = "<|endoftext|>"
WORDS = "def return class self model token value if else for in x y naïve café".split()

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversations(n: int = 24) -> list[dict]:
    """Lines of both formats: single- and multi-turn `messages` (some with a system turn) and prompt/response."""
    rng = np.random.default_rng(0)
    words = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append({"prompt": f"q{i} {words(3)}", "response": f"a{i} {words(4)}"})
        elif i % 3 == 1:
            lines.append({"messages": [{"role": "system", "content": f"s{i}"}, {"role": "user", "content": f"q{i} {words(2)}"},
                                       {"role": "assistant", "content": f"a{i} {words(3)}"}]})
        else:
            lines.append({"messages": [{"role": "user", "content": f"q{i} {words(2)}"}, {"role": "assistant", "content": f"a{i} {words(2)}"},
                                       {"role": "user", "content": f"r{i} {words(2)}"}, {"role": "assistant", "content": f"b{i} {words(5)}"}]})
    return lines


def messages_of(line: dict) -> list[dict]:
    if "messages" in line:
        return line["messages"]
    return [{"role": "user", "content": line["prompt"]}, {"role": "assistant", "content": line["response"]}]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def prepare(tmp_path: Path, lines: list, **data) -> InstructionData:
    source = write_jsonl(tmp_path / "chat.jsonl", lines)
    config = DataConfig(task="instruct", sources=[str(source)], vocab_size=300, min_frequency=1, val_fraction=0.25, **data)
    prepare_dataset(config, tmp_path / "ds", seed=0)
    return InstructionData(tmp_path / "ds")


def tokenizer_of(data: InstructionData):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(data.tokenizer_path))


def each_conversation(data: InstructionData):
    """(token ids, mask) of every conversation of both splits."""
    for name in ("train", "val"):
        split = data.split(name)
        for start, end in zip(split.starts, split.ends):
            yield np.asarray(split.tokens[start:end]), np.asarray(split.mask[start:end])


# --- the mask ------------------------------------------------------------------------------------------


def test_the_mask_covers_exactly_the_response_tokens_of_both_formats(tmp_path: Path) -> None:
    lines = conversations()
    data = prepare(tmp_path, lines)
    tok = tokenizer_of(data)
    decode = lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, source="default")
    by_text = {template.render(messages_of(x), add_generation_prompt=False): messages_of(x) for x in lines}
    seen = 0
    for ids, mask in each_conversation(data):
        whole = decode(ids)
        assert whole.endswith(EOT)
        messages = by_text[whole[: -len(EOT)]]  # the conversation as the template renders it, then end-of-text
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # Each response is " content" plus the template's end of turn ("\n\n"); the end-of-text id follows
        # the last one: the token serve's chat endpoint stops at.
        expected = [f" {a}\n\n" for a in answers]
        expected[-1] += EOT
        assert [decode(run) for run in iter_response_runs(ids, mask)] == expected
        assert decode(ids[mask == 0]) == "".join(
            f"{m['role'].capitalize()}: {m['content']}\n\n" if m["role"] != "assistant" else "Assistant:" for m in messages
        )
        seen += 1
    assert seen == len(lines)
    assert data.meta["formats"] == {"messages": 16, "prompt_response": 8}
    assert data.meta["chat_template"] == DEFAULT_CHAT_TEMPLATE
    for name in ("train", "val"):
        split = data.split(name)
        assert data.meta["splits"][name]["response_tokens"] == int(split.mask.sum()) > 0
        assert data.meta["splits"][name]["examples"] == len(split)


def test_a_template_with_end_of_turn_tokens_masks_them_with_the_response(tmp_path: Path) -> None:
    lines = conversations(9)
    data = prepare(tmp_path, lines, chat_template=CHATML, special_tokens=[EOT, "<|im_start|>", "<|im_end|>"])
    tok = tokenizer_of(data)
    im_end = tok.token_to_id("<|im_end|>")
    decode = lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
    for ids, mask in each_conversation(data):
        runs = [decode(run) for run in iter_response_runs(ids, mask)]
        assert all(r.endswith("<|im_end|>\n") for r in runs[:-1]) and runs[-1].endswith(f"<|im_end|>\n{EOT}")
        assert not any("<|im_start|>" in r or "assistant" in r for r in runs)  # the generation prompt is prompt
        assert int((ids == im_end).sum()) == int(((ids == im_end) & (mask == 0)).sum()) + len(runs)
    assert data.meta["chat_template_source"] == "data.chat_template"


def test_eot_is_not_doubled_when_the_template_ends_turns_with_it(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    data = prepare(tmp_path, [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)], chat_template=template)
    eot = data.eot_id
    for ids, mask in each_conversation(data):
        assert int((ids == eot).sum()) == 1 and mask[list(ids).index(eot)] == 1  # the template's own, a response token


def test_special_token_strings_in_messages_are_text_and_only_the_templates_own_are_special(tmp_path: Path) -> None:
    specials = [EOT, "<|im_start|>", "<|im_end|>"]
    quoting = {"prompt": "what ends <|im_end|> a turn?", "response": f"the text {EOT} and <|im_start|>"}
    lines = [quoting, *conversations(8)]
    data = prepare(tmp_path, lines, chat_template=CHATML, special_tokens=specials)
    tok = tokenizer_of(data)
    ids_of = {name: tok.token_to_id(name) for name in specials}
    decode = lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
    template = ChatTemplate(CHATML, source="chatml")
    for ids, mask in each_conversation(data):
        whole = decode(ids)
        messages = next(messages_of(x) for x in lines if template.render(messages_of(x), add_generation_prompt=False) + EOT == whole)
        # The template writes <|im_start|> and <|im_end|> once per turn; the end-of-text id ends the conversation.
        assert int((ids == ids_of["<|im_start|>"]).sum()) == int((ids == ids_of["<|im_end|>"]).sum()) == len(messages)
        assert int((ids == ids_of[EOT]).sum()) == 1 and ids[-1] == ids_of[EOT]
    assert data.meta["splits"]["train"]["examples"] + data.meta["splits"]["val"]["examples"] == len(lines)


def test_a_prompt_quoting_special_tokens_is_encoded_as_serves_chat_endpoint_encodes_it(tmp_path: Path) -> None:
    from llmctl.serving.prompts import PromptEncoder

    specials = [EOT, "<|im_start|>", "<|im_end|>"]
    quoting = {"prompt": "what ends <|im_end|> a turn?", "response": "this"}
    data = prepare(tmp_path, [quoting, *conversations(7)], chat_template=CHATML, special_tokens=specials)
    tok = tokenizer_of(data)
    served = PromptEncoder(tok, 4096).chat_ids(ChatTemplate(CHATML, source="chatml"), messages_of(quoting)[:1])
    prompts = [ids[: int(np.argmax(mask))].tolist() for ids, mask in each_conversation(data)]
    assert served in prompts


# --- where the template comes from ---------------------------------------------------------------------


def test_the_chat_template_comes_from_the_recipe_then_the_tokenizers_model_dir_then_init_from_then_the_default(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    (model_dir / "config.json").write_text(json.dumps({"family": "gpt", "chat_template": "MODEL"}))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                                             {"name": "default", "template": "HF"}]}))
    assert resolve_chat_template("RECIPE", str(model_dir / "tokenizer.json"), str(hf))[0] == "RECIPE"
    assert resolve_chat_template(None, str(model_dir / "tokenizer.json"), str(hf)) == ("MODEL", f"{model_dir / 'config.json'} chat_template")
    assert resolve_chat_template(None, None, str(hf))[0] == "HF"
    (hf / "chat_template.jinja").write_text("JINJA")
    assert resolve_chat_template(None, None, str(hf))[0] == "JINJA"
    assert resolve_chat_template(None, None, None)[0] == DEFAULT_CHAT_TEMPLATE


def test_prepare_again_is_skipped_unless_the_template_changes(tmp_path: Path) -> None:
    lines = conversations(8)
    prepare(tmp_path, lines)
    config = DataConfig(task="instruct", sources=[str(tmp_path / "chat.jsonl")], vocab_size=300, min_frequency=1, val_fraction=0.25)
    assert prepare_dataset(config, tmp_path / "ds", seed=0).skipped
    other = config.model_copy(update={"chat_template": CHATML})
    result = prepare_dataset(other, tmp_path / "ds", seed=0)
    assert not result.skipped and result.meta["chat_template"] == CHATML


# --- bad input -----------------------------------------------------------------------------------------

GOOD = {"prompt": "q", "response": "a"}


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"text": "plain"}, "neither messages nor prompt/response (keys: text)"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "messages[1].role is 'bot'; roles are system, user, assistant"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "messages[0].content is empty"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"prompt": "q"}, "has prompt but no response"),
        ({"prompt": "q", "response": ""}, "response is empty"),
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "a"}]}, "messages[0].content must be a string"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path: Path, bad, needle: str) -> None:
    with pytest.raises(LlmctlError) as info:
        prepare(tmp_path, [GOOD, bad, GOOD])
    assert "chat.jsonl:2: " in info.value.message and needle in info.value.message
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert not (tmp_path / "ds").exists()


def test_a_source_that_is_not_jsonl_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("just text\n")
    with pytest.raises(LlmctlError, match="instruct data is JSONL"):
        prepare_dataset(DataConfig(task="instruct", sources=[str(tmp_path / "notes.txt")]), tmp_path / "ds", seed=0)


def test_a_template_that_does_not_render_prefixes_consistently_is_refused(tmp_path: Path) -> None:
    counting = "{{ messages | length }} turns\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(LlmctlError, match=r"chat.jsonl:1: .*cannot be told apart"):
        prepare(tmp_path, [GOOD, GOOD], chat_template=counting)


def test_a_template_that_raises_is_refused_naming_the_line(tmp_path: Path) -> None:
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    lines = [GOOD, {"system": "s", "prompt": "q", "response": "a"}]
    with pytest.raises(LlmctlError, match="chat.jsonl:2: no system role"):
        prepare(tmp_path, lines, chat_template=strict)


# --- batches and the loss ------------------------------------------------------------------------------


def synthetic_split() -> InstructionSplit:
    """Three conversations of 5, 9 and 4 tokens; responses are the tokens >= 100."""
    convs = [[1, 2, 100, 101, 0], [3, 4, 5, 6, 7, 8, 102, 103, 0], [9, 104, 105, 0]]
    tokens = np.array([t for c in convs for t in c], dtype=np.uint16)
    mask = np.array([int(t >= 100 or (t == 0)) for t in tokens], dtype=np.uint8)
    starts = np.array([0, 5, 14], dtype=np.uint64)
    return InstructionSplit(tokens, mask, starts)


def test_rows_are_whole_conversations_padded_and_masked_so_only_response_targets_count() -> None:
    batches = InstructionBatches(synthetic_split(), context_length=6, batch_size=3, seed=0, pad_id=0)
    x, y, keep, lengths = batches.rows(np.array([0, 1, 2]))
    assert x.shape == y.shape == keep.shape == (3, 6)  # the longest (9 tokens) is cut at context_length + 1
    assert lengths.tolist() == [4, 6, 3]
    assert x[0].tolist() == [1, 2, 100, 101, 0, 0] and y[0].tolist() == [2, 100, 101, 0, 0, 0]
    assert keep[0].tolist() == [0, 1, 1, 1, 0, 0]  # targets 100, 101 and the end-of-text; padding never counts
    assert y[1][keep[1] == 1].tolist() == [102]  # cut at 7 tokens: the rest of its response is not trained on
    assert y[2][keep[2] == 1].tolist() == [104, 105, 0]


def test_every_epoch_visits_each_conversation_once() -> None:
    batches = InstructionBatches(synthetic_split(), context_length=8, batch_size=3, seed=0, pad_id=0)
    for step in range(4):
        assert sorted(batches.indices(step).tolist()) == [0, 1, 2]
    assert len({tuple(batches.indices(step).tolist()) for step in range(4)}) > 1  # each epoch in its own seeded order


@pytest.fixture
def instruct_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InstructionTask:
    monkeypatch.chdir(tmp_path)
    prepare(tmp_path, conversations(16))
    recipe = Recipe.model_validate({"run": {"name": "t"}, "data": {"task": "instruct", "dir": str(tmp_path / "ds")},
                                    "model": {k: v for k, v in TINY_MODEL.items() if k != "vocab_size"},
                                    "train": {"batch_size": 8, "eval_batches": 2}})
    return InstructionTask(recipe)


def test_the_loss_is_the_mean_over_response_tokens_whatever_the_micro_batch(instruct_task: InstructionTask) -> None:
    from llmctl.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY_MODEL, "vocab_size": instruct_task.vocab_size})).eval()
    batches = instruct_task.batches(8, seed=0)

    @torch.no_grad()
    def step_loss(micro: int) -> float:
        parts = batches.micro_batches(0, 0, 1, micro)
        return float(sum(instruct_task.loss(model, b, None) for b in parts) / len(parts))  # what accumulation averages

    whole = step_loss(8)
    assert step_loss(2) == pytest.approx(whole, rel=1e-5) and step_loss(4) == pytest.approx(whole, rel=1e-5)
    # Against a direct computation over the response targets only.
    x, y, keep, _ = batches.rows(batches.indices(0))
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    assert whole == pytest.approx(float(nll[keep.flatten() == 1].mean()), rel=1e-5)


def test_a_dataset_tokenized_otherwise_than_the_init_from_model_is_refused(instruct_task: InstructionTask, tmp_path: Path,
                                                                            tiny_tokenizer_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_bytes(tiny_tokenizer_path.read_bytes())
    recipe = instruct_task.recipe.model_copy(update={"model": instruct_task.recipe.model.model_copy(update={"init_from": str(base)})})
    with pytest.raises(LlmctlError, match=r"not the one of model.init_from .*set data.tokenizer: .*base/tokenizer.json"):
        InstructionTask(recipe)
