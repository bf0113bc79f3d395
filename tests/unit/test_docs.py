"""docs/recipes.md is generated from the schema: it must match the generator's output."""

from __future__ import annotations

from pathlib import Path

from llmctl.config.reference import REGENERATE, recipe_reference_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_recipe_reference_is_current() -> None:
    page = DOCS / "recipes.md"
    assert page.exists(), f"docs/recipes.md is missing; write it with: {REGENERATE}"
    assert page.read_text(encoding="utf-8") == recipe_reference_markdown(), (
        f"docs/recipes.md is out of date with llmctl/config/schema.py; regenerate it with: {REGENERATE}"
    )


def test_recipe_reference_covers_every_key() -> None:
    from llmctl.config.schema import LoraConfig, Recipe

    page = recipe_reference_markdown()
    for section, field in Recipe.model_fields.items():
        assert f"## {section}\n" in page
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            assert f"| `{key}` |" in page, f"{section}.{key} missing from the reference"
    assert "### train.lora\n" in page
    for key in LoraConfig.model_fields:
        assert f"| `{key}` |" in page


def test_index_links_every_page() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"


def test_no_page_installs_the_unrelated_pypi_llmctl() -> None:
    """PyPI's `llmctl` is someone else's project: the docs install this one by its own distribution name."""
    import re

    root = DOCS.parent
    name = re.search(r'^name = "([^"]+)"$', (root / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    assert name != "llmctl"
    stranger = re.compile(r"pip install\s+(-\S+\s+)*[\"']?llmctl(?![-\w])")
    pages = [root / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("*.yml"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not stranger.search(text), f"{page.name} installs PyPI's llmctl"
    for page in (root / "README.md", DOCS / "index.md", DOCS / "github-actions.yml"):
        assert f"{name} @ git+" in page.read_text(encoding="utf-8"), f"{page.name} does not say how to install {name}"
