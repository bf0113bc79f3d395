"""`model.init_from` and `train.keep_sparsity`: start from a model dir's weights, keep its zeros at zero."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import assert_clean_failure, metrics, run_cli


def _zero_half_of_every_matrix(model_dir: Path) -> dict:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            t.view(-1)[: t.numel() // 2] = 0
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def test_init_from_starts_at_the_given_weights_and_keep_sparsity_keeps_zeros(workdir: Path) -> None:
    from safetensors.torch import load_file

    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/base")
    start = _zero_half_of_every_matrix(workdir / "runs/base/model")
    base_eval = json.loads(run_cli(workdir, "eval", "runs/base/model", "--json").stdout)

    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/ft", "model.init_from=runs/base/model",
            "train.keep_sparsity=true", "train.max_steps=5", "train.eval_every=1", "train.lr=1e-2", "train.warmup_steps=0")
    tuned = load_file(str(workdir / "runs/ft/checkpoints/step-5/model.safetensors"))
    for name, t in start.items():
        if name.endswith("proj.weight"):
            zeros = t == 0
            assert (tuned[name][zeros] == 0).all(), name
            assert not (tuned[name][~zeros] == t[~zeros]).all(), f"{name} did not train"
    # The first training step starts from the given weights: its loss is near the base model's val loss,
    # well below the first loss of the random init the base run started from.
    first = lambda run: [r for r in metrics(workdir / run) if "loss" in r][0]["loss"]  # noqa: E731
    assert abs(first("runs/ft") - base_eval["loss"]) < 0.2
    assert first("runs/base") - first("runs/ft") > 0.3


def test_init_from_a_model_of_another_shape_is_refused(workdir: Path) -> None:
    run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/base")
    proc = run_cli(workdir, "train", "tiny.yaml", "--run-dir", "runs/ft", "model.init_from=runs/base/model",
                   "model.d_model=64", check=False)
    assert_clean_failure(proc, 2, "model.init_from", "runs/base/model", "shapes differ")
    assert not (workdir / "runs/ft/model").exists()
