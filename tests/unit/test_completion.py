"""Shell completion that knows recipes, their keys and values, and the model and export dirs.

Protocol tests run the real `llmctl` in a fresh interpreter with typer's completion variables set, as a shell
would; unit tests call the candidate functions directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llmctl.cli.completion import (
    complete_model_dir,
    complete_model_or_export_dir,
    complete_recipe_file,
    override_candidates,
    recipe_keys,
    value_choices,
)
from tests.unit.test_cli_fast import (
    COMPLETION_MODULE_BUDGET,
    HEAVY_LIBRARIES,
    complete,
    llmctl_run,
    python_c,
    run_counting_imports,
    top_level,
)

TINY = "model:\n  family: gpt\n  n_layer: 2\ntrain:\n  lr: 0.003\n  keep_best: false\n"


def bash(cwd: Path, line: str) -> list[str]:
    """What bash's completion function gets for `line` with the cursor at its end, split at `=` as bash does."""
    words = line.replace("=", " = ").split()
    if line.endswith(" "):
        words.append("")
    got = complete(cwd, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS=" ".join(words), COMP_CWORD=str(len(words) - 1))
    return [g for g in got if g]  # no candidates prints one empty line, which bash reads as none


def zsh(cwd: Path, line: str) -> str:
    return "\n".join(complete(cwd, _LLMCTL_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS=line))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working dir after a few steps: a recipe, two runs, a compressed model and an export."""
    (tmp_path / "my.yaml").write_text(TINY)
    for d, marker in [("runs/my/model", "config.json"), ("runs/big/model", "config.json"), ("runs/broken", None),
                      ("out/my-int8", "config.json"), ("out/my-onnx", "export.json"), ("data/my", "meta.json")]:
        (tmp_path / d).mkdir(parents=True)
        if marker:
            (tmp_path / d / marker).write_text("{}")
    (tmp_path / "out/my-onnx/config.json").write_text("{}")  # an export dir holds the model's config too
    return tmp_path


# --- recipe keys through the real protocol ---------------------------------------------------------------


def test_dotted_keys_complete_after_a_recipe_path(project):
    got = bash(project, "llmctl train my.yaml train.l")
    assert {"train.lr=", "train.log_every=", "train.l1="} <= set(got)  # the value comes next: no space after
    assert all(g.startswith("train.l") and g.endswith("=") for g in got)


def test_enum_value_completes_to_its_choices_in_bash(project):
    assert bash(project, "llmctl train my.yaml model.family=") == ["gpt", "rnn", "lstm", "gru"]
    assert bash(project, "llmctl train my.yaml model.family=g") == ["gpt", "gru"]


def test_free_value_completes_to_the_recipes_current_value(project):
    assert bash(project, "llmctl train my.yaml train.lr=") == ["0.003"]  # from my.yaml
    assert bash(project, "llmctl train my.yaml train.max_steps=") == ["1000"]  # not in my.yaml: the schema default


def test_boolean_value_completes_to_true_false(project):
    assert bash(project, "llmctl prepare my.yaml train.keep_best=") == ["true", "false"]


def test_earlier_overrides_do_not_confuse_the_next_key(project):
    got = bash(project, "llmctl tune my.yaml train.lr=3e-4 tune.sampler=")
    assert got == ["tpe", "random", "grid", "cmaes"]


def test_an_unset_path_key_offers_nothing_so_the_shell_completes_files(project):
    assert bash(project, "llmctl train my.yaml data.dir=") == []


def test_zsh_and_fish_get_whole_words_with_help(project):
    out = zsh(project, "llmctl train my.yaml model.family=")
    assert '"model.family=lstm"' in out
    out = zsh(project, "llmctl train my.yaml train.lo")
    assert '"train.log_every=":"Write a metrics.jsonl row every N steps."' in out
    fish = complete(project, _LLMCTL_COMPLETE="complete_fish", _TYPER_COMPLETE_FISH_ACTION="get-args",
                    _TYPER_COMPLETE_ARGS="llmctl train my.yaml ")
    assert "train.lr=\tPeak learning rate." in fish
    assert all("\t" in line for line in fish)  # one candidate a line: no help wrapped onto a line of its own


def test_the_bash_script_drops_the_space_after_a_dir_or_key_and_show_completion_prints_it(project):
    shipped = (Path(__file__).resolve().parents[2] / "completions" / "llmctl.bash").read_text(encoding="utf-8")
    assert "compopt -o nospace" in shipped and "*[/=]" in shipped
    # What --install-completion writes too; the variable makes typer take the shell's name instead of detecting it.
    shown = llmctl_run("--show-completion", "bash", cwd=project, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == shipped.strip()


def test_an_options_value_after_equals_still_completes_in_bash(project):
    assert "my.yaml" in bash(project, "llmctl compress runs/my/model --recipe=")


# --- artifact dirs through the real protocol ---------------------------------------------------------------


def test_eval_and_serve_offer_model_and_export_dirs_but_not_run_dirs(project):
    for command in ("eval", "serve"):
        got = bash(project, f"llmctl {command} ")
        assert {"runs/my/model", "runs/big/model", "out/my-int8", "out/my-onnx"} <= set(got)
        assert "runs/broken/model" not in got
    assert bash(project, "llmctl eval runs/m") == ["runs/my/model", "runs/my/"]


def test_compress_and_export_offer_model_dirs_only(project):
    for command in ("compress", "export"):
        got = bash(project, f"llmctl {command} out/")
        assert got == ["out/my-int8"]


def test_eval_compare_completes_every_dir(project):
    assert "out/my-onnx" in bash(project, "llmctl eval --compare runs/my/model ")


# --- unit: the candidate functions ------------------------------------------------------------------------


def test_every_offered_value_is_one_the_schema_accepts():
    from pydantic import TypeAdapter

    offered = 0
    for key, (annotation, _, _) in recipe_keys().items():
        choices, _ = value_choices(annotation)
        for choice in choices:
            TypeAdapter(annotation).validate_python(yaml.safe_load(choice))  # parsed as the loader parses overrides
            offered += 1
    assert offered > 40


def test_keys_are_exactly_the_schemas_settings():
    from llmctl.config.schema import Recipe, unknown_recipe_key

    keys = recipe_keys()
    assert {k.split(".")[0] for k in keys} == set(Recipe.model_fields)
    for key in keys:
        if key.count(".") == 1 and not key.startswith("tune."):
            assert unknown_recipe_key(key) is None, key
    assert {"train.lr", "model.family", "train.lora.rank", "export.opset"} <= set(keys)
    assert "train.lora" not in keys and "train" not in keys  # sections are walked into, not offered as values


def test_override_candidates_read_the_recipe_then_the_schema(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    assert override_candidates("model.n_layer=", recipe) == [("model.n_layer=2", "")]
    assert override_candidates("model.n_layer=", None) == [("model.n_layer=4", "")]
    assert override_candidates("model.n_layer=9", recipe) == []
    assert override_candidates("train.micro_batch_size=", recipe) == [
        ("train.micro_batch_size=auto", ""), ("train.micro_batch_size=null", "")]
    assert override_candidates("nope.key=", recipe) == []
    recipe.write_text("train: [unclosed\n")  # a half-written recipe falls back to the schema
    assert override_candidates("train.lr=", recipe) == [("train.lr=0.001", "")]


def test_key_help_is_one_short_line():
    for _, help, _ in recipe_keys().values():
        assert help and "\n" not in help and len(help) <= 60


def test_recipe_file_completion_keeps_the_typed_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("")
    (tmp_path / "sub" / ".b.yaml").write_text("")
    assert complete_recipe_file("./s") == ["./sub/"]
    assert complete_recipe_file("sub/") == ["sub/a.yaml"]
    assert complete_recipe_file("sub/.") == ["sub/.b.yaml"]
    assert complete_recipe_file("nowhere/") == []


def test_model_dir_completion_tells_models_from_exports(project, monkeypatch):
    monkeypatch.chdir(project)
    assert complete_model_dir("out/") == ["out/my-int8"]
    assert complete_model_or_export_dir("out/") == ["out/my-int8", "out/my-onnx"]
    assert complete_model_dir("runs/b") == ["runs/big/model", "runs/big/", "runs/broken/"]
    assert complete_model_dir("data/") == ["data/my/"]  # a dir to descend into, not an artifact


# --- still light --------------------------------------------------------------------------------------------


def test_key_completion_loads_no_heavy_library(project):
    code = (
        "import os, sys\n"
        "os.environ.update(_LLMCTL_COMPLETE='complete_bash', COMP_WORDS='llmctl train my.yaml model.family =',"
        " COMP_CWORD='4')\n"
        "import llmctl.cli\n"
        "try:\n"
        "    llmctl.cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'accelerate' in sys.modules)\n"
    )
    result = python_c(code, project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gpt", "rnn", "lstm", "gru", "False False"]
    script = Path(sys.executable).parent / "llmctl"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "llmctl"]
    completed, modules = run_counting_imports(
        command, project, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS="llmctl train my.yaml train.l", COMP_CWORD="3"
    )
    assert completed.returncode == 0, completed.stderr
    assert "train.lr=" in completed.stdout.split()  # the completion really ran
    assert not top_level(modules) & HEAVY_LIBRARIES, sorted(top_level(modules) & HEAVY_LIBRARIES)
    # A budget in modules, not seconds: the recipe schema (pydantic, yaml) adds about 120 to --help's.
    assert len(modules) < COMPLETION_MODULE_BUDGET, f"completing a recipe key imported {len(modules)} modules"
