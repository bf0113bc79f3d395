"""Recipes: schema defaults, typed overrides, file:line:key errors, cross-field checks, the shipped catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmctl.config import Recipe, apply_overrides, load_recipe, parse_recipe_text, recipe_to_yaml, validate_recipe
from llmctl.config.catalog import copy_recipe, recipe_names, recipe_path, recipes_dir
from llmctl.errors import EXIT_BAD_INPUT, LlmctlError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write a recipe file into tmp_path (the cwd) and return its path."""
    monkeypatch.chdir(tmp_path)

    def make(text: str, name: str = "r.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return make


def error_of(path, overrides=None) -> LlmctlError:
    with pytest.raises(LlmctlError) as info:
        load_recipe(path, overrides or [])
    return info.value


# --- defaults and run.name ---------------------------------------------------------------------------


def test_empty_recipe_takes_every_default_and_its_name_from_the_file_stem(write):
    recipe = load_recipe(write("", "my-model.yaml"))
    assert recipe.run.name == "my-model" and recipe.name == "my-model"
    assert recipe.run.seed == 0
    assert [s.path for s in recipe.data.sources] == ["builtin:stdlib"]
    assert recipe.data.vocab_size == 4096 and recipe.data.special_tokens == ["<|endoftext|>"]
    assert (recipe.model.family, recipe.model.n_layer, recipe.model.n_head, recipe.model.d_model) == ("gpt", 4, 4, 128)
    assert recipe.model.vocab_size is None and recipe.model.tie_embeddings is True
    assert recipe.train.lr == 1e-3 and recipe.train.optimizer == "adamw" and recipe.train.schedule == "cosine"
    assert recipe.train.micro_batch_size is None and recipe.train.compile is False
    assert recipe.data_dir() == Path("data") / "my-model"


def test_run_name_in_the_file_wins_over_the_stem(write):
    assert load_recipe(write("run:\n  name: other\n", "stem.yaml")).name == "other"


def test_data_dir_setting_replaces_the_default_dataset_dir(write):
    assert load_recipe(write("data:\n  dir: somewhere/ds\n")).data_dir() == Path("somewhere/ds")


def test_a_plain_string_source_is_a_path_and_a_mapping_keeps_format_and_field(write):
    recipe = load_recipe(write("data:\n  sources:\n    - a.txt\n    - {path: b.jsonl, format: jsonl, field: body}\n"))
    a, b = recipe.data.sources
    assert (a.path, a.format, a.field) == ("a.txt", "auto", "text")
    assert (b.path, b.format, b.field) == ("b.jsonl", "jsonl", "body")


def test_run_name_with_a_slash_is_refused(write):
    path = write("run:\n  name: a/b\n")
    assert error_of(path).message.startswith(f"{path}:2 run.name: must be a plain name without '/'")


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_coerce_to_the_schema_types(write):
    recipe = load_recipe(
        write(""),
        ["train.lr=3e-4", "model.n_layer=2", "train.compile=true", "data.sources=[a.txt,b.txt]"],
    )
    assert isinstance(recipe.train.lr, float) and recipe.train.lr == pytest.approx(3e-4)
    assert isinstance(recipe.model.n_layer, int) and recipe.model.n_layer == 2
    assert recipe.train.compile is True
    assert [s.path for s in recipe.data.sources] == ["a.txt", "b.txt"]


def test_override_replaces_the_file_value_and_leaves_the_file_dict_untouched():
    data, _ = parse_recipe_text("train:\n  lr: 0.1\n  max_steps: 5\n", "x.yaml")
    out, keys = apply_overrides(data, ["train.lr=0.5", "model.n_head=2"])
    assert out["train"] == {"lr": 0.5, "max_steps": 5} and out["model"] == {"n_head": 2}
    assert keys == {"train.lr", "model.n_head"}
    assert data == {"train": {"lr": 0.1, "max_steps": 5}}  # a copy was changed, not the input


def test_override_can_set_run_name(write):
    assert load_recipe(write("", "stem.yaml"), ["run.name=custom"]).name == "custom"


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", ".lr=1"])
def test_malformed_override_shows_the_expected_form(bad):
    with pytest.raises(LlmctlError, match=r"expected section\.key=value, e\.g\. train\.lr=3e-4"):
        apply_overrides({}, [bad])


def test_override_below_a_plain_value_is_refused():
    with pytest.raises(LlmctlError, match=r"train\.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_bad_override_value_is_blamed_on_the_command_line(write):
    err = error_of(write("train:\n  lr: 0.1\n"), ["train.lr=abc"])
    assert err.message.startswith("command line train.lr: must be a number, got 'abc'")
    assert err.kind == "recipe" and err.exit_code == EXIT_BAD_INPUT


# --- errors that name file:line and key --------------------------------------------------------------


def test_negative_lr_names_file_line_key_and_bound(write):
    path = write("run:\n  seed: 1\ntrain:\n  max_steps: 10\n  lr: -0.001\n")
    err = error_of(path)
    assert err.message.startswith(f"{path}:5 train.lr: must be > 0, got -0.001")
    assert err.kind == "recipe" and err.exit_code == EXIT_BAD_INPUT


def test_error_in_a_list_item_names_the_item_line_and_index(write):
    path = write("data:\n  sources:\n    - a.txt\n    - {path: b.jsonl, format: xml}\n")
    assert error_of(path).message.startswith(
        f"{path}:4 data.sources[1].format: must be one of 'auto', 'text', 'jsonl' or 'csv', got 'xml'"
    )


def test_wrong_type_in_the_file_says_what_type_is_expected(write):
    path = write("model:\n  n_layer: two\n")
    assert error_of(path).message.startswith(f"{path}:2 model.n_layer: must be an integer, got 'two'")


def test_unknown_key_in_the_file_suggests_the_close_key(write):
    path = write("train:\n  max_steps: 3\n  lrr: 0.1\n")
    message = error_of(path).message
    assert message.startswith(f"{path}:3 train.lrr: unknown key")
    assert "did you mean train.lr?" in message


def test_unknown_key_with_no_close_match_lists_the_section_keys(write):
    message = error_of(write("train:\n  zzzzzz: 1\n")).message
    assert "train.zzzzzz: unknown key; expected one of:" in message and "max_steps" in message


def test_unknown_key_from_an_override_is_blamed_on_the_command_line(write):
    message = error_of(write("train:\n  lr: 0.1\n"), ["train.lrr=1"]).message
    assert message.startswith("command line train.lrr: unknown key")
    assert "did you mean train.lr?" in message


def test_unknown_section_from_an_override_is_blamed_on_the_command_line(write):
    # The user typed `trian.lr=1`; the file has no `trian`, so pointing at the file misleads.
    message = error_of(write("train:\n  lr: 0.1\n"), ["trian.lr=1"]).message
    assert message.startswith("command line trian: unknown key"), message
    assert "did you mean train?" in message


def test_did_you_mean_hint_ends_the_sentence_once(write):
    # "did you mean train.lr?." reads as a typo; the question mark should end the message.
    message = error_of(write("train:\n  lrr: 0.1\n")).message
    assert not message.endswith("?."), message


def test_several_problems_are_listed_one_per_line_with_their_lines(write):
    path = write("train:\n  lr: 1\n  foo: 2\n  max_steps: 0\n")
    message = error_of(path).message
    assert message.startswith(f"recipe {path} has 2 problems:")
    lines = sorted(line.strip() for line in message.splitlines()[1:])
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:3 train.foo: unknown key")
    assert lines[1] == f"{path}:4 train.max_steps: must be >= 1, got 0"


def test_yaml_syntax_error_names_the_line(write):
    path = write("train:\n  lr: 0.1\n  max_steps: [1, 2\nmodel:\n  n_layer: 2\n")
    err = error_of(path)
    assert err.message.startswith(f"{path}:")
    line = int(err.message[len(str(path)) + 1 :].split(":")[0])
    assert line in (3, 4)  # the open bracket's line, or where the parser gave up on it
    assert "not valid YAML" in err.message


def test_yaml_with_a_tab_indent_names_its_line(write):
    path = write("train:\n  lr: 0.1\n\tmax_steps: 3\n")
    assert error_of(path).message.startswith(f"{path}:3: not valid YAML")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_a_recipe_that_is_not_a_mapping_is_refused(write, text, kind):
    path = write(text)
    message = error_of(path).message
    assert message.startswith(f"{path}:1: a recipe is a mapping of sections")
    assert message.endswith(f"got {kind}.")


def test_a_key_given_twice_in_a_section_names_both_lines_and_the_key(write):
    path = write("train:\n  lr: 3.0e-3\n  max_steps: 5\n  lr: 0.5\n")
    err = error_of(path)
    assert err.message.startswith(f"{path}:4 train.lr: given twice (first at line 2)")
    assert err.exit_code == EXIT_BAD_INPUT and err.kind == "recipe"


def test_a_section_given_twice_is_refused(write):
    path = write("model:\n  n_layer: 2\ntrain:\n  lr: 0.1\nmodel:\n  n_layer: 6\n")
    assert error_of(path).message.startswith(f"{path}:5 model: given twice (first at line 1)")


def test_a_key_twice_inside_a_list_item_is_refused(write):
    path = write("data:\n  sources:\n    - {path: a.csv, field: text, field: review}\n")
    assert error_of(path).message.startswith(f"{path}:3 data.sources[0].field: given twice")


def test_the_same_key_in_different_sections_is_fine(write):
    path = write("train:\n  max_steps: 5\ntune:\n  max_steps: 3\n")
    recipe = load_recipe(path)
    assert (recipe.train.max_steps, recipe.tune.max_steps) == (5, 3)


def test_yaml_merge_keys_are_not_duplicates(write):
    path = write("train:\n  <<: {lr: 0.1, max_steps: 4}\n  max_steps: 7\n")
    recipe = load_recipe(path)
    assert (recipe.train.lr, recipe.train.max_steps) == (0.1, 7)


@pytest.mark.parametrize("override, problem", [
    ("data.sources=[a.txt, b", "expected ',' or ']'"),
    ("data.sources={path: a.csv", "expected ',' or '}'"),
    ("train.betas=[0.9, 0.95", "expected ',' or ']'"),
])
def test_broken_yaml_list_on_the_command_line_is_refused(write, override, problem):
    path = write("run: {seed: 0}\n")
    err = error_of(path, [override])
    key = override.split("=")[0]
    assert err.message.startswith(f"command line {key}: not valid YAML ({problem}")
    assert err.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize("override, key, value", [
    ("data.sources=*.txt", "sources", [{"path": "*.txt"}]),
    ("data.sources=**/*.py", "sources", [{"path": "**/*.py"}]),
    ("data.dir=[weird", "dir", "[weird"),
    ("data.tokenizer=@tok.json", "tokenizer", "@tok.json"),
])
def test_plain_strings_that_yaml_cannot_read_still_work_unquoted(write, override, key, value):
    path = write("run: {seed: 0}\n")
    data = load_recipe(path, [override]).data.model_dump(mode="json")
    got = data[key]
    assert (got if not isinstance(value, list) else [{"path": s["path"]} for s in got]) == value


def test_a_jinja_chat_template_on_the_command_line_stays_a_string(write):
    path = write("data: {task: instruct}\n")
    template = "{{ messages[0]['content'] }}{% if add_generation_prompt %}A:{% endif %}"
    assert load_recipe(path, [f"data.chat_template={template}"]).data.chat_template == template


@pytest.mark.parametrize("value", ["tensorboard", "[tensorboard]"])
def test_log_with_takes_one_tracker_name_or_a_list(write, value):
    path = write("run: {seed: 0}\n")
    assert load_recipe(path, [f"train.log_with={value}"]).train.log_with == ["tensorboard"]


def test_an_unknown_tracker_in_an_override_is_blamed_on_the_command_line(write):
    path = write("train:\n  lr: 0.1\n")
    assert error_of(path, ["train.log_with=tensorbored"]).message.startswith("command line train.log_with[0]: must be one of")


def test_missing_recipe_file_points_at_the_shipped_recipes(tmp_path):
    with pytest.raises(LlmctlError, match=r"nope\.yaml: no such recipe file.*llmctl recipes ls"):
        load_recipe(tmp_path / "nope.yaml")


def test_non_utf8_recipe_names_the_byte(write, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(LlmctlError, match=r"latin1\.yaml: not UTF-8 at byte 16"):
        load_recipe(path)


def test_error_without_source_lines_still_names_the_source():
    with pytest.raises(LlmctlError, match=r"^here\.yaml train\.lr: must be > 0"):
        validate_recipe({"train": {"lr": 0}}, "here.yaml")


# --- cross-field checks ------------------------------------------------------------------------------


def test_micro_batch_size_must_divide_batch_size(write):
    path = write("train:\n  batch_size: 8\n  micro_batch_size: 3\n")
    message = error_of(path).message
    assert message.startswith(f"{path}:1 train:")
    assert "batch_size (8) must be a multiple of micro_batch_size (3)" in message


def test_micro_batch_size_larger_than_batch_size_is_refused(write):
    message = error_of(write("train:\n  batch_size: 4\n  micro_batch_size: 8\n")).message
    assert "micro_batch_size (8) cannot exceed batch_size (4)" in message


def test_micro_batch_size_that_divides_is_accepted(write):
    assert load_recipe(write("train:\n  batch_size: 8\n  micro_batch_size: 2\n")).train.micro_batch_size == 2


def test_d_model_must_be_a_multiple_of_n_head(write):
    path = write("model:\n  d_model: 30\n  n_head: 4\n")
    message = error_of(path).message
    assert message.startswith(f"{path}:1 model:") and "d_model (30) must be a multiple of n_head (4)" in message


def test_head_size_must_be_even_for_rotary(write):
    assert "must be even for rotary" in error_of(write("model:\n  d_model: 36\n  n_head: 4\n")).message


def test_n_head_must_be_a_multiple_of_n_kv_head(write):
    message = error_of(write("model:\n  d_model: 32\n  n_head: 4\n  n_kv_head: 3\n")).message
    assert "n_head (4) must be a multiple of n_kv_head (3)" in message
    assert load_recipe(write("model:\n  d_model: 32\n  n_head: 4\n  n_kv_head: 2\n", "ok.yaml")).model.n_kv_head == 2


def test_cross_field_error_from_an_override_names_both_fields(write):
    message = error_of(write("model:\n  d_model: 32\n"), ["model.n_head=3"]).message
    assert "d_model (32) must be a multiple of n_head (3)" in message


def test_betas_out_of_range_are_refused(write):
    assert "each beta must be in [0, 1)" in error_of(write("train:\n  betas: [0.9, 1.0]\n")).message


def test_repeated_special_token_is_refused(write):
    assert "repeated token" in error_of(write("data:\n  special_tokens: [a, a]\n")).message


def test_empty_sources_are_refused(write):
    assert "needs at least one source" in error_of(write("data:\n  sources: []\n")).message


# --- round trip and shipped recipes ------------------------------------------------------------------


def test_recipe_to_yaml_round_trips_to_an_equal_recipe(write):
    recipe = load_recipe(
        write("model:\n  n_kv_head: 2\n  norm_eps: 1.0e-6\ntrain:\n  lr: 3.0e-4\n  betas: [0.8, 0.99]\n", "rt.yaml"),
        ["data.sources=[a.txt,{path: b.csv, field: body}]"],
    )
    text = recipe_to_yaml(recipe)
    assert list(yaml.safe_load(text)) == ["run", "data", "model", "train", "tune", "compress", "export"]
    again = validate_recipe(yaml.safe_load(text), "again.yaml")
    assert again == recipe
    assert again.model_dump() == recipe.model_dump()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.name == path.stem
    # Its summary is the first comment line, shown by `recipes ls`.
    assert path.read_text(encoding="utf-8").startswith("# ")


def test_shipped_recipes_are_found():
    assert {p.stem for p in SHIPPED} >= {"tiny-gpt", "gpt-124m"}


# --- catalog -----------------------------------------------------------------------------------------


def test_recipes_dir_is_the_source_checkout_recipes_folder():
    assert recipes_dir().resolve() == (REPO_ROOT / "recipes").resolve()


def test_recipe_names_lists_the_shipped_recipes_sorted():
    names = recipe_names()
    assert "tiny-gpt" in names and "gpt-124m" in names
    assert names == sorted(names)


def test_recipe_path_accepts_the_name_with_or_without_yaml():
    assert recipe_path("tiny-gpt") == recipe_path("tiny-gpt.yaml") == recipes_dir() / "tiny-gpt.yaml"


def test_recipe_path_suggests_the_close_name():
    with pytest.raises(LlmctlError, match=r"no shipped recipe named 'tiny-gtp'; did you mean tiny-gpt\?") as info:
        recipe_path("tiny-gtp")
    assert "gpt-124m" in info.value.message  # the list of names follows


def test_recipe_path_without_a_close_name_lists_the_recipes():
    with pytest.raises(LlmctlError) as info:
        recipe_path("zzzzzzzz")
    assert "did you mean" not in info.value.message and "tiny-gpt" in info.value.message


def test_copy_recipe_writes_a_file_and_refuses_to_overwrite_without_force(tmp_path):
    dest = tmp_path / "my.yaml"
    assert copy_recipe("tiny-gpt", dest) == dest
    assert dest.read_text(encoding="utf-8") == recipe_path("tiny-gpt").read_text(encoding="utf-8")
    dest.write_text("# mine\n", encoding="utf-8")
    with pytest.raises(LlmctlError, match=r"my\.yaml already exists; pass --force"):
        copy_recipe("tiny-gpt", dest)
    assert dest.read_text(encoding="utf-8") == "# mine\n"  # untouched
    copy_recipe("tiny-gpt", dest, force=True)
    assert dest.read_text(encoding="utf-8") == recipe_path("tiny-gpt").read_text(encoding="utf-8")


def test_copy_recipe_into_a_directory_keeps_the_recipe_file_name(tmp_path):
    assert copy_recipe("gpt-124m", tmp_path) == tmp_path / "gpt-124m.yaml"
    assert (tmp_path / "gpt-124m.yaml").is_file()


def test_copied_recipe_takes_the_new_file_stem_as_run_name(tmp_path):
    dest = copy_recipe("tiny-gpt", tmp_path / "fork.yaml")
    assert load_recipe(dest).name == "fork"


def test_tiny_recipe_fixture_validates_with_the_tiny_shape(tiny_recipe):
    recipe = load_recipe(tiny_recipe("tiny"))
    assert (recipe.model.n_layer, recipe.model.n_head, recipe.model.d_model) == (2, 2, 32)
    assert recipe.model.context_length == 32 and recipe.model.vocab_size == 300
    assert recipe.train.batch_size == 8 and recipe.name == "tiny"


# --- a model dir's config.json -------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, problem", [
    ("n_layer", "two", "n_layer: must be an integer, got 'two'"),
    ("n_layer", "2", "n_layer: must be an integer, got '2'"),
    ("n_layer", 0, "n_layer: must be >= 1, got 0"),
    ("tie_embeddings", "yes", "tie_embeddings: must be true or false"),
    ("family", "transformer", "family: must be one of"),
    ("num_classes", "2", "num_classes: must be an integer"),
])
def test_model_config_with_a_wrong_type_names_the_file_and_key(key, value, problem):
    from llmctl.config.loader import check_model_config

    config = {"family": "gpt", "vocab_size": 300, "n_layer": 2, "n_head": 2, "d_model": 32, "rope_theta": 10000,
              key: value}
    with pytest.raises(LlmctlError) as info:
        check_model_config(config, "m/config.json")
    assert info.value.message.startswith(f"m/config.json {problem}")
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_model_config_as_llmctl_writes_it_passes():
    from llmctl.config.loader import check_model_config

    check_model_config({"family": "rnn", "vocab_size": 300, "n_layer": 1, "d_model": 8, "hidden_size": 8,
                        "num_classes": 2, "pad_id": 0, "labels": ["neg", "pos"], "max_len": 16, "pooling": "last",
                        "dropout": 0, "quantization": {"scheme": "int8"}}, "m/config.json")
