"""Bad input: a clear message naming what and where, exit status 2, no traceback, nothing corrupted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.integration.conftest import assert_clean_failure, run_cli


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_source(workdir: Path) -> None:
    proc = run_cli(workdir, "prepare", "tiny.yaml", "data.sources=[nowhere/*.txt]", check=False)
    assert_clean_failure(proc, 2, "nowhere/*.txt")


def test_empty_source(workdir: Path) -> None:
    (workdir / "empty.txt").write_text("")
    proc = run_cli(workdir, "prepare", "tiny.yaml", "data.sources=[empty.txt]", check=False)
    assert_clean_failure(proc, 2, "empty.txt", "empty")


def test_user_file_that_is_not_utf8_names_file_and_offset(workdir: Path) -> None:
    (workdir / "latin1.txt").write_bytes(b"def ok():\n    return 1\n" + "caf\u00e9\n".encode("latin-1"))
    proc = run_cli(workdir, "prepare", "tiny.yaml", "data.sources=[latin1.txt]", check=False)
    offset = len(b"def ok():\n    return 1\ncaf")
    assert_clean_failure(proc, 2, "latin1.txt", f"byte {offset}", "encoding_errors")
    run_cli(workdir, "prepare", "tiny.yaml", "data.sources=[latin1.txt, corpus]", "data.encoding_errors=replace")
    meta = json.loads((workdir / "data/tiny/meta.json").read_text())
    assert meta["sources"]["replaced_chars"] == 1


def test_jsonl_line_that_is_not_json_names_file_and_line(workdir: Path) -> None:
    run_cli(workdir, "prepare", "tiny.yaml")
    before = _digest(workdir / "data/tiny")
    lines = [json.dumps({"text": f"def f{i}(): return {i}"}) for i in range(5)]
    lines.insert(3, "{not json")
    (workdir / "docs.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli(workdir, "prepare", "tiny.yaml", "data.sources=[corpus, docs.jsonl]", check=False)
    assert_clean_failure(proc, 2, "docs.jsonl:4")
    assert _digest(workdir / "data/tiny") == before  # the earlier dataset dir is untouched


def test_model_dir_whose_tokenizer_does_not_match_its_vocabulary(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=2")
    model = workdir / "runs/tiny/model"
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100
    (model / "config.json").write_text(json.dumps(config))
    proc = run_cli(workdir, "eval", "runs/tiny/model", check=False)
    assert_clean_failure(proc, 2, "tokenizer.json has", "vocab_size is 100")


def test_typo_in_a_recipe_key_suggests_the_right_one(workdir: Path) -> None:
    text = (workdir / "tiny.yaml").read_text().replace("  lr: 3.0e-3", "  lrate: 3.0e-3")
    (workdir / "tiny.yaml").write_text(text)
    line = text.splitlines().index("  lrate: 3.0e-3") + 1
    proc = run_cli(workdir, "train", "tiny.yaml", check=False)
    assert_clean_failure(proc, 2, f"tiny.yaml:{line} train.lrate: unknown key; did you mean train.lr?")
    assert not (workdir / "runs").exists() and not (workdir / "data").exists()  # refused before any work


def test_negative_learning_rate(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "train.lr=-0.001", check=False)
    assert_clean_failure(proc, 2, "command line train.lr: must be > 0, got -0.001")
    text = (workdir / "tiny.yaml").read_text().replace("  lr: 3.0e-3", "  lr: -3.0e-3")
    (workdir / "tiny.yaml").write_text(text)
    line = text.splitlines().index("  lr: -3.0e-3") + 1
    proc = run_cli(workdir, "recipes", "validate", "tiny.yaml", "--json", check=False)
    assert_clean_failure(proc, 2, f"tiny.yaml:{line} train.lr: must be > 0")
    assert json.loads(proc.stdout)["error"]["kind"] == "recipe"


def test_checkpoint_dir_that_is_not_one(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    fake = workdir / "runs/tiny/checkpoints/step-99"
    fake.mkdir()
    (fake / "notes.txt").write_text("not a checkpoint")
    before = _digest(workdir / "runs/tiny")
    proc = run_cli(workdir, "train", "tiny.yaml", "--resume", check=False)
    assert_clean_failure(proc, 2, "step-99", "not a checkpoint")
    assert _digest(workdir / "runs/tiny") == before


def test_eval_of_a_dir_that_is_not_a_model_dir(workdir: Path) -> None:
    (workdir / "nomodel").mkdir()
    proc = run_cli(workdir, "eval", "nomodel", check=False)
    assert_clean_failure(proc, 2, "nomodel", "neither a model dir")


def test_nproc_zero(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "--nproc", "0", check=False)
    assert proc.returncode == 2 and "--nproc" in proc.stderr and "Traceback" not in proc.stderr


def test_more_devices_than_the_machine_has(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "--devices", "0,7", check=False)
    assert_clean_failure(proc, 2, "--devices asks for GPU")
    proc = run_cli(workdir, "train", "tiny.yaml", "--devices", "zero", check=False)
    assert_clean_failure(proc, 2, "--devices 'zero'")


def test_accelerate_config_that_does_not_parse(workdir: Path) -> None:
    (workdir / "acc.yaml").write_text("compute_environment: [LOCAL_MACHINE\n  num_processes: 2\n")
    proc = run_cli(workdir, "train", "tiny.yaml", "--accelerate-config", "acc.yaml", check=False)
    assert_clean_failure(proc, 2, "--accelerate-config acc.yaml: not a valid Accelerate config")
    assert not (workdir / "runs").exists()


def test_resume_without_a_checkpoint(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "--resume", check=False)
    assert_clean_failure(proc, 2, "no checkpoint to resume from")


def test_checkpoint_from_a_different_model_shape(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    proc = run_cli(workdir, "train", "tiny.yaml", "model.d_model=64", "--resume", check=False)
    assert_clean_failure(proc, 2, "model.d_model", "differ")
    # Even without the run's recipe.yaml to compare with, loading the weights refuses it.
    (workdir / "runs/tiny/recipe.yaml").unlink()
    before = _digest(workdir / "runs/tiny")
    proc = run_cli(workdir, "train", "tiny.yaml", "model.d_model=64", "--resume", check=False)
    assert_clean_failure(proc, 2, "cannot be loaded into this recipe's model")
    assert _digest(workdir / "runs/tiny") == before


# --- output paths over inputs, recipes that say a thing twice, broken command-line YAML -----------------


def test_run_dir_that_is_the_dataset_dir_is_refused_and_leaves_it_untouched(workdir: Path) -> None:
    run_cli(workdir, "prepare", "tiny.yaml")
    before = _digest(workdir / "data/tiny")
    proc = run_cli(workdir, "train", "tiny.yaml", "--run-dir", "data/tiny", check=False)
    assert_clean_failure(proc, 2, "--run-dir data/tiny: the same path as the dataset dir (data/tiny), which this command reads")
    assert _digest(workdir / "data/tiny") == before


def test_run_dir_inside_a_source_directory_is_refused(workdir: Path) -> None:
    proc = run_cli(workdir, "train", "tiny.yaml", "--run-dir", "corpus/run", check=False)
    assert_clean_failure(proc, 2, "--run-dir corpus/run: inside data.sources[0] (corpus)")
    assert not (workdir / "corpus/run").exists() and not (workdir / "data").exists()


def test_run_dir_that_is_an_existing_file_is_refused(workdir: Path) -> None:
    (workdir / "notes.txt").write_text("mine\n")
    proc = run_cli(workdir, "train", "tiny.yaml", "--run-dir", "notes.txt", "--json", check=False)
    assert_clean_failure(proc, 2, "--run-dir notes.txt: is an existing file")
    assert json.loads(proc.stdout)["error"]["kind"] == "bad_input"
    assert (workdir / "notes.txt").read_text() == "mine\n"


def test_dataset_dir_inside_a_source_directory_is_refused(workdir: Path) -> None:
    proc = run_cli(workdir, "prepare", "tiny.yaml", "data.dir=corpus/ds", check=False)
    assert_clean_failure(proc, 2, "data.dir corpus/ds: inside the directory source data.sources[0] 'corpus'")
    assert not (workdir / "corpus/ds").exists()


def test_a_recipe_key_given_twice_is_refused_with_its_line(workdir: Path) -> None:
    text = (workdir / "tiny.yaml").read_text().replace("  lr: 3.0e-3\n", "  lr: 3.0e-3\n  lr: 0.5\n")
    (workdir / "tiny.yaml").write_text(text)
    line = text.splitlines().index("  lr: 0.5") + 1
    proc = run_cli(workdir, "train", "tiny.yaml", check=False)
    assert_clean_failure(proc, 2, f"tiny.yaml:{line} train.lr: given twice (first at line {line - 1})")
    assert not (workdir / "data").exists()


def test_a_broken_yaml_list_on_the_command_line_is_refused(workdir: Path) -> None:
    proc = run_cli(workdir, "prepare", "tiny.yaml", "data.sources=[a.txt, b", check=False)
    assert_clean_failure(proc, 2, "command line data.sources: not valid YAML (")
    assert "glob" not in proc.stderr


def test_model_dir_config_with_a_wrong_type_names_the_file_and_key(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=2")
    config_file = workdir / "runs/tiny/model/config.json"
    config = json.loads(config_file.read_text())
    config["n_layer"] = "two"
    config_file.write_text(json.dumps(config))
    proc = run_cli(workdir, "eval", "runs/tiny/model", check=False)
    assert_clean_failure(proc, 2, "runs/tiny/model/config.json n_layer: must be an integer, got 'two'")


def test_a_directory_source_skips_bytecode_and_version_control_and_says_how_many(workdir: Path) -> None:
    pkg = workdir / "corpus"
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__/doc0.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" + os.urandom(64))
    (pkg / ".git").mkdir()
    (pkg / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (pkg / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    proc = run_cli(workdir, "prepare", "tiny.yaml", "--json")
    assert "directory sources: skipped 1 binary file, 2 directories (.git, __pycache__)" in proc.stderr
    assert json.loads(proc.stdout)["files"] == 6  # the six text files, no bytecode
