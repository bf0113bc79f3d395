"""The real `llmctl` command, for everything that needs no training: help, recipes verbs, errors, completion.

Each test runs the installed package in a fresh interpreter, as a person's shell would.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmctl

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "llmctl"
COMPLETION_VARS = ("_LLMCTL_COMPLETE", "_TYPER_COMPLETE_ARGS", "_TYPER_COMPLETE_FISH_ACTION", "COMP_WORDS", "COMP_CWORD")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in COMPLETION_VARS}
    env.update(COLUMNS="200", NO_COLOR="1", **extra)
    return env


def llmctl_run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=60,
    )


def python_c(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )


# Libraries whose import costs a second or more (shared/NOTES.md): `--help` and completion must load none.
HEAVY_LIBRARIES = frozenset({
    "torch", "accelerate", "onnxruntime", "onnx", "onnxscript", "optuna", "fastapi", "uvicorn", "starlette",
    "transformers", "numpy", "safetensors", "tokenizers", "matplotlib", "sqlalchemy", "torchao",
})
HELP_MODULE_BUDGET = 450
COMPLETION_MODULE_BUDGET = 650


def run_counting_imports(command: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `command` (a Python program) with `PYTHONPROFILEIMPORTTIME`; its result and every module it imported.

    Python's import-time report names each module once, whatever the load on the machine, so the set is
    what a budget can be checked against where seconds could not.
    """
    result = subprocess.run(
        command, cwd=cwd, env=clean_env(PYTHONPROFILEIMPORTTIME="1", **env), capture_output=True, text=True, timeout=120
    )
    modules, other = set(), []
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":
                modules.add(name)
        else:
            other.append(line)
    result.stderr = "\n".join(other)
    return result, modules


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def complete(cwd: Path, **env: str) -> list[str]:
    """Drive shell completion through typer's real protocol; the candidates, one per line."""
    result = llmctl_run(cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# --- import cost -------------------------------------------------------------------------------------


def test_importing_the_cli_imports_neither_torch_nor_accelerate(tmp_path):
    result = python_c(
        "import sys, llmctl.cli; print(sorted(m for m in ('torch', 'accelerate', 'numpy') if m in sys.modules))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_lists_every_command_and_loads_no_heavy_library(tmp_path):
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "llmctl"]
    result, modules = run_counting_imports([*command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("prepare", "train", "eval", "recipes"):
        assert f" {name} " in result.stdout, result.stdout
    assert not top_level(modules) & HEAVY_LIBRARIES, sorted(top_level(modules) & HEAVY_LIBRARIES)
    # A budget in modules, not seconds: typer, rich and llmctl.cli load about 330 today.
    assert len(modules) < HELP_MODULE_BUDGET, f"llmctl --help imported {len(modules)} modules"


def test_no_arguments_prints_the_first_steps_and_exits_0(tmp_path):
    result = llmctl_run(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for step in ("make demo", "llmctl recipes ls", "llmctl recipes cp tiny-gpt my.yaml", "llmctl train my.yaml",
                 "llmctl --help"):
        assert step in result.stdout, step


def test_an_unknown_command_suggests_the_closest_and_exits_2(tmp_path):
    result = llmctl_run("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert "no such command 'trian'; did you mean 'train'?" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    sub = llmctl_run("recipes", "shwo", cwd=tmp_path)
    assert sub.returncode == 2 and "did you mean 'show'?" in sub.stderr


def test_an_unknown_command_with_nothing_close_lists_the_commands(tmp_path):
    result = llmctl_run("xyzzy", cwd=tmp_path)
    assert result.returncode == 2
    assert "no such command 'xyzzy'; commands: prepare, train" in result.stderr


def test_version_prints_the_package_version(tmp_path):
    result = llmctl_run("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"llmctl {llmctl.__version__}"


# --- recipes verbs -----------------------------------------------------------------------------------


def test_recipes_ls_lists_shipped_recipes_with_their_purpose(tmp_path):
    result = llmctl_run("recipes", "ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tiny-gpt" in result.stdout and "gpt-124m" in result.stdout
    assert "Tiny Llama-style GPT" in result.stdout  # the first comment line of tiny-gpt.yaml


def test_recipes_show_prints_the_recipe_file_verbatim(tmp_path):
    result = llmctl_run("recipes", "show", "tiny-gpt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO_ROOT / "recipes" / "tiny-gpt.yaml").read_text(encoding="utf-8")


def test_recipes_show_of_a_typo_suggests_the_name_and_exits_2(tmp_path):
    result = llmctl_run("recipes", "show", "tiny-gtp", cwd=tmp_path)
    assert result.returncode == 2
    assert "did you mean tiny-gpt?" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_recipes_cp_then_validate_json_prints_one_object_named_after_the_file(tmp_path):
    cp = llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    import yaml

    copied, shipped = (tmp_path / "my.yaml").read_text(), (REPO_ROOT / "recipes" / "tiny-gpt.yaml").read_text()
    assert yaml.safe_load(copied) == yaml.safe_load(shipped)  # only comments differ (they name my.yaml)
    result = llmctl_run("recipes", "validate", "my.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # the whole of stdout is exactly one JSON document
    assert out["valid"] is True
    assert out["recipe"]["run"]["name"] == "my"
    assert out["recipe"]["model"]["n_layer"] == 4 and out["recipe"]["train"]["lr"] == 3e-3


def test_recipes_cp_renames_the_recipe_in_its_comments_but_not_in_its_values(tmp_path):
    assert llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", cwd=tmp_path).returncode == 0
    text = (tmp_path / "my.yaml").read_text()
    assert "tiny-gpt" not in text and "tiny-int8" not in text
    assert "llmctl train my.yaml train.lr=3e-3" in text and "runs/my/model -o out/my-int8" in text
    assert llmctl_run("recipes", "cp", "lora-instruct", "ft.yaml", cwd=tmp_path).returncode == 0
    text = (tmp_path / "ft.yaml").read_text()
    assert "llmctl train ft.yaml" in text and "llmctl serve runs/ft/model" in text
    # Another recipe's name (the base model it fine-tunes) is not this recipe's: comments and values keep it.
    assert "llmctl train recipes/tiny-gpt.yaml" in text and "init_from: runs/tiny-gpt/model" in text


def test_recipes_cp_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "my.yaml").write_text("# mine\n")
    result = llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert (tmp_path / "my.yaml").read_text() == "# mine\n"
    assert llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", "--force", cwd=tmp_path).returncode == 0
    assert (tmp_path / "my.yaml").read_text() != "# mine\n"


def test_recipes_validate_applies_overrides_and_prints_the_resolved_yaml(tmp_path):
    import yaml

    llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", cwd=tmp_path)
    result = llmctl_run("recipes", "validate", "my.yaml", "train.lr=3e-4", "model.n_layer=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["lr"] == pytest.approx(3e-4) and resolved["model"]["n_layer"] == 2
    assert resolved["run"]["name"] == "my"
    assert "my.yaml: valid" in result.stderr


BAD = "run:\n  seed: 0\ntrain:\n  lr: -0.001\n"


def test_recipes_validate_of_a_bad_recipe_names_file_line_key_and_exits_2(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    result = llmctl_run("recipes", "validate", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.yaml:4 train.lr: must be > 0, got -0.001" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_recipes_validate_json_error_is_exactly_one_error_object(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    result = llmctl_run("recipes", "validate", "bad.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 2
    out = json.loads(result.stdout)
    assert set(out) == {"error"} and set(out["error"]) == {"message", "kind"}
    assert out["error"]["message"].startswith("bad.yaml:4 train.lr: must be > 0")
    assert out["error"]["kind"] == "recipe"
    assert "Traceback" not in result.stderr


def test_quiet_keeps_stdout_and_errors_and_drops_the_rest_of_stderr(tmp_path):
    llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", cwd=tmp_path)
    loud = llmctl_run("recipes", "cp", "tiny-gpt", "my.yaml", "--force", cwd=tmp_path)
    quiet = llmctl_run("--quiet", "recipes", "cp", "tiny-gpt", "my.yaml", "--force", cwd=tmp_path)
    assert loud.returncode == quiet.returncode == 0 and loud.stderr.strip() and not quiet.stderr.strip()
    (tmp_path / "bad.yaml").write_text(BAD)
    failed = llmctl_run("-q", "recipes", "validate", "bad.yaml", "--json", cwd=tmp_path, LLMCTL_QUIET="1")
    assert failed.returncode == 2 and "train.lr: must be > 0" in failed.stderr
    assert set(json.loads(failed.stdout)) == {"error"}


def test_recipes_validate_blames_a_bad_override_on_the_command_line(tmp_path):
    (tmp_path / "ok.yaml").write_text("train:\n  lr: 0.1\n")
    result = llmctl_run("recipes", "validate", "ok.yaml", "train.lrr=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "command line train.lrr: unknown key; did you mean train.lr?" in result.stderr


def test_recipes_validate_of_a_missing_file_exits_2_and_points_at_recipes_ls(tmp_path):
    result = llmctl_run("recipes", "validate", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.yaml: no such recipe file" in result.stderr and "llmctl recipes ls" in result.stderr


def test_recipes_schema_is_json_schema_with_bounds_and_help(tmp_path):
    result = llmctl_run("recipes", "schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == {"run", "data", "model", "train", "tune", "compress", "export"}
    lr = schema["$defs"]["TrainConfig"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and lr["default"] == 1e-3 and lr["description"]


def test_train_refuses_a_bad_recipe_before_any_work(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    result = llmctl_run("train", "bad.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["message"].startswith("bad.yaml:4 train.lr: must be > 0")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_train_refuses_resume_with_overwrite(tmp_path, tiny_recipe):
    tiny_recipe("tiny")
    result = llmctl_run("train", "tiny.yaml", "--resume", "--overwrite", cwd=tmp_path)
    assert result.returncode == 2 and "--resume and --overwrite contradict each other" in result.stderr
    assert not (tmp_path / "runs").exists()


# --- shell completion --------------------------------------------------------------------------------


def test_bash_completion_of_a_recipe_name(tmp_path):
    got = complete(tmp_path, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS="llmctl recipes show t", COMP_CWORD="3")
    assert got == ["tiny-gpt", "tiny-gpt-tune"]  # every name starting with "t", no other


def test_bash_completion_of_subcommands(tmp_path):
    got = complete(tmp_path, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS="llmctl recipes ", COMP_CWORD="2")
    assert {"ls", "show", "cp", "validate", "schema"} <= set(got)


def test_zsh_completion_offers_both_recipe_names(tmp_path):
    out = "\n".join(complete(tmp_path, _LLMCTL_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS="llmctl recipes cp "))
    assert '"tiny-gpt"' in out and '"gpt-124m"' in out


def test_fish_completion_offers_both_recipe_names(tmp_path):
    got = complete(
        tmp_path,
        _LLMCTL_COMPLETE="complete_fish",
        _TYPER_COMPLETE_FISH_ACTION="get-args",
        _TYPER_COMPLETE_ARGS="llmctl recipes cp ",
    )
    assert {line.split("\t")[0] for line in got} >= {"tiny-gpt", "gpt-124m"}


def test_recipe_file_completion_offers_yaml_files_and_dirs_only(tmp_path):
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden.yaml").write_text("")
    got = complete(tmp_path, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS="llmctl train ", COMP_CWORD="2")
    assert "a.yaml" in got and "sub/" in got
    assert not any("b.txt" in g or "hidden" in g for g in got)


def test_recipe_file_completion_descends_into_a_typed_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yml").write_text("")
    (tmp_path / "sub" / "notes.md").write_text("")
    got = complete(tmp_path, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS="llmctl train sub/", COMP_CWORD="2")
    assert got == ["sub/r.yml"]


def test_completion_does_not_import_torch(tmp_path):
    code = (
        "import os, sys\n"
        "os.environ.update(_LLMCTL_COMPLETE='complete_bash', COMP_WORDS='llmctl train ', COMP_CWORD='2')\n"
        "import llmctl.cli\n"
        "try:\n"
        "    llmctl.cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'accelerate' in sys.modules)\n"
    )
    (tmp_path / "a.yaml").write_text("")
    result = python_c(code, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "a.yaml" in lines  # the completion really ran
    assert lines[-1] == "False False"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shipped_completion_scripts_exist_and_use_the_protocol(shell):
    script = REPO_ROOT / "completions" / f"llmctl.{shell}"
    assert script.is_file()
    text = script.read_text(encoding="utf-8")
    assert "_LLMCTL_COMPLETE" in text and f"complete_{shell}" in text


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shipped_completion_scripts_match_what_llmctl_generates(tmp_path, shell):
    # `make completions` regenerates them; a stale copy would drive an outdated protocol.
    result = llmctl_run(cwd=tmp_path, _LLMCTL_COMPLETE=f"source_{shell}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (REPO_ROOT / "completions" / f"llmctl.{shell}").read_text(encoding="utf-8").strip()


def _every_command_path() -> list[list[str]]:
    import typer.main

    from llmctl.cli import app

    root = typer.main.get_command(app)
    paths = [[]]
    for name, command in root.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(command, "commands", {})]
    return paths


def test_every_help_shows_flags_without_a_value_type_and_one_usage_style():
    from typer.testing import CliRunner

    from llmctl.cli import app

    runner = CliRunner()
    for path in _every_command_path():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        usage = next(line for line in result.output.splitlines() if "Usage:" in line)
        # Arguments as typer writes them, lower case: {recipe} [overrides]... {model_dir} {paths}...
        for word in usage.split()[2 + len(path):]:
            if word not in ("[OPTIONS]", "COMMAND", "[ARGS]..."):
                assert re.fullmatch(r"(\{[a-z_]+\}|\[[a-z_]+\])(\.\.\.)?", word), (path, usage)


def test_eval_help_says_data_takes_a_labelled_file_and_samples_are_greedy_by_default(tmp_path):
    result = llmctl_run("eval", "--help", cwd=tmp_path)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert "a classifier also takes a labelled CSV or JSONL file" in text
    assert "0: greedy" in text and "[default: 0.0]" in text
