"""docs/github-actions.yml runs as a user's CI would run it: in a scratch repository with no llmctl source,
llmctl installed the way the workflow installs it.

The workflow installs `llmctl-toolchain @ git+<repo URL>`. Here the URL becomes a wheel built from this
checkout (pip then checks that the name the workflow asks for is the name the wheel carries), installed
into a fresh venv that reuses this venv's dependencies instead of downloading them. Each `run:` step then
runs with bash -e, in order, in the scratch repo. The one liberty taken: after the step that copies the
recipe, the copy is shrunk (a few KB of local text, a 2-layer model) so the job takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import write_corpus

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "docs" / "github-actions.yml"
DIST_NAME = "llmctl-toolchain"
# The actions a user's runner provides; everything else in the workflow must be a `run:` step.
PROVIDED_ACTIONS = {"actions/checkout", "actions/setup-python", "actions/upload-artifact"}


def _job() -> dict:
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    (job,) = workflow["jobs"].values()
    return job


def _shrink_recipe(path: Path) -> None:
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe["data"].update(sources=["corpus"], vocab_size=300, val_fraction=0.2)
    recipe["model"].update(n_layer=2, n_head=2, d_model=32, context_length=32)
    recipe["train"].update(batch_size=8, eval_every=100, eval_batches=2, log_every=50, checkpoint_every=300)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def test_the_workflow_names_this_distribution_and_no_pypi_llmctl() -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    assert not re.search(r"pip install (-\S+ )*[\"']?llmctl([\"'\s]|$)", text), "installs PyPI's unrelated 'llmctl'"
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf'^name = "{DIST_NAME}"$', pyproject, re.M)
    spec = _job()["env"]["LLMCTL_SPEC"]
    assert spec.startswith(f"{DIST_NAME} @ git+https://") and "REPLACE-ME" in spec


@pytest.mark.slow
def test_the_workflow_steps_run_in_a_scratch_repo(tmp_path: Path) -> None:
    job = _job()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name.startswith(DIST_NAME.replace("-", "_") + "-")

    venv = tmp_path / "venv"
    # No pip or setuptools of its own: those (new enough for torch's metadata) come from this venv too.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # This venv's packages (torch, typer, ...) after the new venv's own; a .pth line adds no editable install.
    (site / "reuse-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    repo = tmp_path / "user-repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    write_corpus(repo / "corpus", files=6, lines=200)
    env = {
        **os.environ, **{k: str(v) for k, v in job.get("env", {}).items()},
        "LLMCTL_SPEC": f"{DIST_NAME} @ {wheel.as_uri()}",
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_NO_INDEX": "1",  # every dependency is already there: nothing may be downloaded
        "VIRTUAL_ENV": str(venv),
    }
    env.pop("PYTHONPATH", None)

    ran = []
    for step in job["steps"]:
        if "uses" in step:
            assert step["uses"].split("@")[0] in PROVIDED_ACTIONS, step
            continue
        script = step["run"]
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"step {step.get('name')!r} exited {proc.returncode}\n{script}\n{proc.stdout}\n{proc.stderr}"
        ran.append(step.get("name"))
        copied = re.search(r"llmctl recipes cp \S+ (\S+)", script)
        if copied:
            _shrink_recipe(repo / copied.group(1))

    assert len(ran) == 7
    # The llmctl that ran is the installed wheel, not this checkout.
    where = subprocess.run([venv / "bin" / "python", "-c", "import llmctl; print(llmctl.__file__)"],
                           cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where
    assert not (repo / "recipes").exists()
    evaluated = json.loads((repo / "eval.json").read_text())
    assert evaluated["gate"]["passed"] and evaluated["tokens"] <= 16384
    assert json.loads((repo / "export.json").read_text())["passed"]
    assert (repo / "report" / "report.html").is_file()
