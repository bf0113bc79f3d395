"""compress, export and eval across backends, through the real CLI on a tiny trained model."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import assert_clean_failure, run_cli, run_cli_with, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained model for the whole module: each test writes under its own out/ name."""
    return train_tiny(tmp_path_factory.mktemp("edge"))


def _staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(".*.tmp")]


def test_compress_prunes_and_quantizes_into_a_model_dir_that_eval_loads(trained: Path) -> None:
    source_config = trained / "runs/tiny/model/config.json"
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    source_config.write_text(json.dumps({**json.loads(source_config.read_text()), "chat_template": template}))
    proc = run_cli(trained, "compress", "runs/tiny/model", "--prune", "0.3", "--quantize", "int8", "-o", "out/c", "--json")
    report = json.loads(proc.stdout)
    before, after = report["before"], report["after"]
    assert before["parameters"] == after["parameters"]
    # Layer weights are pruned 30%: a quarter-ish of all weights (embeddings are not pruned) become zero.
    assert after["nonzero_parameters"] < 0.9 * before["nonzero_parameters"]
    assert after["size_bytes"] < 0.5 * before["size_bytes"]
    assert after["perplexity"] > 1 and before["perplexity"] > 1
    for key in ("forward_ms", "generate_tokens_per_s"):
        assert after[key] > 0 and before[key] > 0
    out = trained / "out/c"
    assert json.loads((out / "compression.json").read_text())["after"]["perplexity"] == pytest.approx(after["perplexity"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["scheme"] == "int8"
    assert config["chat_template"] == template  # serve's chat endpoint still finds the model's template
    ev = json.loads(run_cli(trained, "eval", "out/c", "--json").stdout)
    assert ev["backend"] == "torch-int8"
    assert ev["perplexity"] == pytest.approx(after["perplexity"], rel=1e-6)


def test_structured_pruning_with_recovery_writes_a_smaller_model_that_exports(trained: Path) -> None:
    run_cli(trained, "compress", "runs/tiny/model", "--prune", "0.5", "--prune-method", "structured",
            "--recover-steps", "3", "-o", "out/small")
    config = json.loads((trained / "out/small/config.json").read_text())
    original = json.loads((trained / "runs/tiny/model/config.json").read_text())
    assert config["n_head"] < original["n_head"] and config["d_ff"] < original["d_ff"]
    report = json.loads((trained / "out/small/compression.json").read_text())
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["recovery"]["steps"] == 3
    export = json.loads(run_cli(trained, "export", "out/small", "-o", "out/small-onnx", "--json").stdout)
    assert export["passed"] is True


def test_export_verifies_quantizes_and_eval_compares_backends(trained: Path) -> None:
    proc = run_cli_with(trained, {"LLMCTL_PROGRESS_EVERY_S": "0"}, "export", "runs/tiny/model", "-o", "out/onnx",
                        "--quantize", "int8", "--json")
    export = json.loads(proc.stdout)
    assert export["passed"] is True
    # No terminal: one line per stage, then plain counted lines with an ETA; no bar, no escape codes.
    assert re.search(r"verifying against PyTorch .*\n(\s+\d+\.\ds   \d+/\d+ steps \(\d+%\), eta \d+s\n)+", proc.stderr)
    assert re.search(r"int8: perplexity \(per-channel\)\n(.*\n)*.*/[\d,]+ tokens \(100%\), eta 0s", proc.stderr)
    assert "\x1b[" not in proc.stderr and "━" not in proc.stderr
    assert {r["output"] for r in export["rows"]} >= {"logits"}
    assert (trained / "out/onnx/model.onnx").is_file() and (trained / "out/onnx/model.int8.onnx").is_file()
    manifest = json.loads((trained / "out/onnx/export.json").read_text())
    assert manifest["opset"] >= 17 and "verification" in manifest and "int8" in manifest

    torch_eval = json.loads(run_cli(trained, "eval", "runs/tiny/model", "--json").stdout)
    onnx_eval = json.loads(run_cli(trained, "eval", "out/onnx", "--json").stdout)
    assert onnx_eval["backend"] == "onnxruntime"
    assert onnx_eval["perplexity"] == pytest.approx(torch_eval["perplexity"], rel=1e-4)

    run_cli(trained, "compress", "runs/tiny/model", "--quantize", "int8", "-o", "out/q", "--no-speed")
    compare = json.loads(run_cli(trained, "eval", "--compare", "runs/tiny/model", "out/q", "out/onnx", "--json").stdout)
    assert [r["backend"] for r in compare["rows"]] == ["torch", "torch-int8", "onnxruntime", "onnxruntime-int8"]
    assert compare["rows"][0]["perplexity_change_pct"] == 0
    assert compare["rows"][2]["perplexity"] == pytest.approx(torch_eval["perplexity"], rel=1e-4)
    human = run_cli(trained, "eval", "--compare", "runs/tiny/model", "out/onnx").stdout
    assert "perplexity" in human and "onnxruntime-int8" in human


def test_export_beyond_the_tolerance_exits_3_and_keeps_the_files(trained: Path) -> None:
    proc = run_cli(trained, "export", "runs/tiny/model", "-o", "out/strict", "--atol", "0", check=False)
    assert_clean_failure(proc, 3, "parity check failed", "differs by up to", "--atol")
    assert (trained / "out/strict/model.onnx").is_file()
    ev = run_cli(trained, "eval", "out/strict", "--max-tokens", "64")
    assert "failed its parity check" in ev.stderr
    assert json.loads((trained / "out/strict/export.json").read_text())["verification"]["passed"] is False


def test_bad_compress_and_export_input_exits_2_and_writes_nothing(trained: Path) -> None:
    (trained / "out").mkdir(exist_ok=True)
    (trained / "out/file").write_text("keep me")
    cases = [
        (("compress", "corpus", "--prune", "0.3", "-o", "out/x"), "corpus", "not a model dir"),
        (("compress", "runs/tiny/model", "--prune", "1.0", "-o", "out/x"), "--prune"),
        (("compress", "runs/tiny/model", "--prune", "-0.1", "-o", "out/x"), "--prune"),
        (("compress", "runs/tiny/model", "--prune", "0.3", "-o", "out/file"), "out/file", "existing file"),
        (("export", "runs/tiny/model", "-o", "out/x", "--opset", "16"), "--opset"),
        (("export", "runs/tiny/model", "-o", "out/file"), "out/file"),
        (("export", "corpus", "-o", "out/x"), "corpus"),
        (("eval", "corpus"), "corpus"),
    ]
    for args, *needles in cases:
        assert_clean_failure(run_cli(trained, *args, check=False), 2, *needles)
    assert not (trained / "out/x").exists()
    assert (trained / "out/file").read_text() == "keep me"
    assert _staging_left(trained / "out") == []


def _run_in_terminal(cwd: Path, *args: str) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as in a person's shell; (exit status, output)."""
    parent, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NO_COLOR", "LLMCTL_QUIET")}
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", *args], cwd=cwd, env={**env, "COLUMNS": "160"},
                            stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return proc.wait(timeout=240), b"".join(chunks).decode("utf-8", "replace")


def test_on_a_terminal_each_stage_draws_a_bar_with_an_eta(trained: Path) -> None:
    code, out = _run_in_terminal(trained, "compress", "runs/tiny/model", "--quantize", "int8", "-o", "out/t", "--no-speed")
    assert code == 0, out
    assert "\x1b[" in out  # rich redraws the bars in place
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    final = [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    quantized = [line for line in final if "quantizing to int8" in line and "tensors (100%)" in line]
    scored = [line for line in final if "perplexity of out/t (torch-int8) on" in line and "tokens (100%)" in line]
    assert quantized and scored, text[-3000:]
    assert all("eta" in line and "━" in line for line in quantized + scored)
    assert "compression (same machine, same run)" in text


def _model_with_recipe_defaults(trained: Path, name: str, compress: dict, export: dict) -> str:
    """A copy of the tiny model whose recorded recipe has these compress and export sections."""
    import shutil

    model = trained / "runs" / name / "model"
    shutil.copytree(trained / "runs/tiny/model", model)
    provenance = json.loads((model / "llmctl.json").read_text())
    provenance["recipe"].update(compress=compress, export=export)
    (model / "llmctl.json").write_text(json.dumps(provenance))
    return f"runs/{name}/model"


def test_a_compression_flag_keeps_the_recipes_other_choices_out_and_what_applies_is_printed(trained: Path) -> None:
    model = _model_with_recipe_defaults(trained, "defaults", {"prune": 0.3, "prune_method": "layer", "quantize": "int8"},
                                        {"quantize": "int8"})
    only_int8 = run_cli(trained, "compress", model, "--quantize", "int8", "-o", "out/only-int8", "--no-speed", "--json")
    report = json.loads(only_int8.stdout)
    assert report["options"]["prune"] == 0 and report["pruning"] is None
    assert report["after"]["nonzero_parameters"] > 0.97 * report["before"]["nonzero_parameters"]  # int8 rounds a few to 0
    assert "from recipe" not in only_int8.stderr and report["from_recipe"] == {}

    only_pruned = json.loads(run_cli(trained, "compress", model, "--prune", "0.2", "-o", "out/only-pruned", "--no-speed",
                                     "--json").stdout)
    assert only_pruned["options"]["quantize"] == "none" and only_pruned["pruning"]["method"] == "layer"
    assert "quantization" not in json.loads((trained / "out/only-pruned/config.json").read_text())

    plain = run_cli(trained, "compress", model, "-o", "out/recipe", "--no-speed")
    lines = plain.stderr.splitlines()
    for line in ("from recipe: prune 0.3 (compress.prune)", "from recipe: prune method layer (compress.prune_method)",
                 "from recipe: quantize int8 (compress.quantize)"):
        assert line in lines, plain.stderr
    assert json.loads((trained / "out/recipe/compression.json").read_text())["options"]["prune"] == 0.3

    exported = run_cli(trained, "export", model, "-o", "out/recipe-onnx")
    assert any(line.startswith("from recipe: quantize int8 (export.quantize)") for line in exported.stderr.splitlines())
    assert (trained / "out/recipe-onnx/model.int8.onnx").is_file()
    fp32_only = run_cli(trained, "export", model, "-o", "out/fp32-onnx", "--quantize", "none")
    assert "from recipe" not in fp32_only.stderr and not (trained / "out/fp32-onnx/model.int8.onnx").exists()


def test_compress_and_export_name_a_bad_input_path_before_anything_else(trained: Path) -> None:
    (trained / "empty").mkdir(exist_ok=True)
    cases = [("no_such_dir", "no_such_dir: no such directory; {verb} takes a model dir"),
             ("empty", "empty: not a model dir (missing config.json"),
             ("tiny.yaml", "tiny.yaml: a file; {verb} takes a model dir"),
             ("data/tiny", "data/tiny: a dataset dir (what `llmctl prepare` writes), not a model dir"),
             ("runs/tiny", "runs/tiny: a run dir, not a model dir; use runs/tiny/model")]
    for verb in ("compress", "export"):
        for path, needle in cases:
            proc = run_cli(trained, verb, path, "-o", "out/never", check=False)
            assert_clean_failure(proc, 2, needle.format(verb=verb))
            assert "nothing to do" not in proc.stderr
    assert not (trained / "out/never").exists()


def test_an_output_inside_an_input_is_refused(trained: Path) -> None:
    before = sorted(p.name for p in (trained / "runs/tiny/model").iterdir())
    cases = [("runs/tiny/model/inside", "-o runs/tiny/model/inside: inside the model dir (runs/tiny/model)"),
             ("data/tiny/inside", "inside the model's dataset dir"),
             ("data/tiny", "the same path as the model's dataset dir")]
    for verb, extra in (("compress", ("--quantize", "int8")), ("export", ())):
        for out, needle in cases:
            assert_clean_failure(run_cli(trained, verb, "runs/tiny/model", *extra, "-o", out, check=False), 2, needle)
        proc = run_cli(trained, verb, "runs/tiny/model", *extra, "--data", "data/tiny", "-o", "data/tiny/x", check=False)
        assert_clean_failure(proc, 2, "inside --data (data/tiny)")
    assert sorted(p.name for p in (trained / "runs/tiny/model").iterdir()) == before
    assert not (trained / "runs/tiny/model/inside").exists() and not (trained / "data/tiny/inside").exists()


def test_eval_samples_greedily_by_default_and_says_how_it_decoded(trained: Path) -> None:
    args = ("eval", "runs/tiny/model", "--max-tokens", "64", "--prompt", "def ", "--max-new-tokens", "8")
    default = run_cli(trained, *args, "--json")
    greedy = json.loads(run_cli(trained, *args, "--temperature", "0", "--json").stdout)
    report = json.loads(default.stdout)
    assert report["decoding"] == {"mode": "greedy", "temperature": 0.0}
    assert report["samples"] == greedy["samples"]
    assert "samples: greedy" in run_cli(trained, *args).stderr
    sampled = run_cli(trained, *args, "--temperature", "0.8")
    assert "samples: sampled at temperature 0.8, top-k 50, seed 0" in sampled.stderr
