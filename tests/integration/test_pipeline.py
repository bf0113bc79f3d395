"""The real CLI end to end on a tiny recipe: prepare -> train -> eval, resume, determinism."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import TINY_RECIPE, metrics, run_cli


def test_prepare_train_eval_end_to_end(workdir: Path) -> None:
    prep = run_cli(workdir, "prepare", "tiny.yaml", "--json")
    info = json.loads(prep.stdout)
    assert info["dataset_dir"] == "data/tiny" and info["train_tokens"] > 1000 and info["val_tokens"] > 0
    assert (workdir / "data/tiny/train.bin").stat().st_size == info["train_tokens"] * 2  # uint16

    train = run_cli(workdir, "train", "tiny.yaml", "train.lr=1e-3", "model.n_layer=1", "--json")
    result = json.loads(train.stdout)
    run = workdir / "runs/tiny"
    assert result["step"] == 10 and result["model_dir"] == "runs/tiny/model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llmctl.json"):
        assert (run / "model" / name).is_file()
    config = json.loads((run / "model/config.json").read_text())
    assert config["family"] == "gpt" and config["n_layer"] == 1 and config["format_version"] == 1
    resolved = (run / "recipe.yaml").read_text()
    assert "lr: 0.001" in resolved and "n_layer: 1" in resolved
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"):
        assert key in train_rows[0]
    assert train_rows[-1]["tokens"] == 10 * 8 * 32
    assert any("val_loss" in r for r in rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]

    ev = run_cli(workdir, "eval", "runs/tiny/model", "--json", "--prompt", "def ", "--max-new-tokens", "8")
    report = json.loads(ev.stdout)  # exactly one JSON object on stdout
    for key in ("loss", "perplexity", "bits_per_byte", "tokens"):
        assert isinstance(report[key], (int, float))
    assert abs(report["perplexity"] - 2.718281828 ** report["loss"]) < 1e-3 * report["perplexity"]
    assert report["unigram_perplexity"] > 1
    assert report["samples"][0]["prompt"] == "def "

    human = run_cli(workdir, "eval", "runs/tiny/model", "--prompt", "def ")
    assert "perplexity" in human.stdout and "bits per byte" in human.stdout


def test_eval_on_text_files_uses_the_models_tokenizer(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    (workdir / "extra.txt").write_text("def value return data\n" * 40, encoding="utf-8")
    report = json.loads(run_cli(workdir, "eval", "runs/tiny/model", "--text", "extra.txt", "--json").stdout)
    assert report["source"] == "extra.txt" and report["tokens"] > 40
    # Every byte but those of the first token (which nothing predicts) is scored.
    assert len("def value return data\n") * 40 - 4 <= report["bytes"] < len("def value return data\n") * 40


def test_same_recipe_and_seed_give_the_same_loss_curve(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/a")
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/b")
    losses = lambda d: [r["loss"] for r in metrics(workdir / d) if "loss" in r]  # noqa: E731
    assert losses("runs/a") == losses("runs/b")


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(workdir: Path) -> None:
    # Dropout on, so the restored RNG state matters; a constant lr, so stopping the first leg at
    # max_steps=5 is the same as an interruption right after the step-5 checkpoint.
    recipe = TINY_RECIPE.format(max_steps=10).replace("n_layer: 2", "n_layer: 2, dropout: 0.1")
    (workdir / "tiny.yaml").write_text(recipe + "  schedule: constant\n")
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/whole")
    run_cli(workdir, "train", "tiny.yaml", "train.max_steps=5", "--run-dir", "runs/cut")
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/cut", "--resume")
    whole, cut = metrics(workdir / "runs/whole"), metrics(workdir / "runs/cut")
    assert [r["step"] for r in cut if "loss" in r] == list(range(1, 11))
    assert [r["loss"] for r in cut if "loss" in r] == [r["loss"] for r in whole if "loss" in r]
    assert [r["val_loss"] for r in cut if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r]


def test_existing_run_is_refused_without_resume_or_overwrite(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml")
    again = run_cli(workdir, "train", "tiny.yaml", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (workdir / "runs/tiny/model/model.safetensors").is_file()  # nothing lost
    run_cli(workdir, "train", "tiny.yaml", "--overwrite", "train.max_steps=5")
    assert max(r["step"] for r in metrics(workdir / "runs/tiny")) == 5


def test_early_stopping_keeps_the_best_model(workdir: Path) -> None:
    # With min_delta larger than any possible gain, only the first evaluation counts as better.
    out = run_cli(workdir, "train", "tiny.yaml", "train.max_steps=60", "train.patience=2", "train.min_delta=100", "--json")
    result = json.loads(out.stdout)
    assert result["stopped_early"] is True and result["step"] == 15 and result["best_step"] == 5
    assert "early stopping at step 15" in out.stderr
    best = json.loads((workdir / "runs/tiny/model/llmctl.json").read_text())
    assert best["step"] == 5
    assert (workdir / "runs/tiny/checkpoints/best/model.safetensors").is_file()
    assert (workdir / "runs/tiny/checkpoints/step-15").is_dir()  # resumable where it stopped
