"""The wheel carries the shipped recipes, and an installed llmctl finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_installed_wheel_finds_the_shipped_recipes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("llmctl_toolchain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "llmctl/_recipes/tiny-gpt.yaml" in names and "llmctl/_recipes/gpt-124m.yaml" in names

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", "import llmctl.config.catalog as c; print(c.recipes_dir()); print(c.recipe_names())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )
    where, names_line = proc.stdout.splitlines()
    assert Path(where) == target / "llmctl" / "_recipes"
    assert "tiny-gpt" in names_line
