"""Shell-completion candidates; cheap to compute, importing nothing heavy."""

from __future__ import annotations

from pathlib import Path


def complete_recipe_name(incomplete: str) -> list[str]:
    from llmctl.config.catalog import recipe_names

    try:
        return [n for n in recipe_names() if n.startswith(incomplete)]
    except Exception:
        return []


def complete_recipe_file(incomplete: str) -> list[str]:
    """YAML files and directories under the typed prefix (recipe paths)."""
    base = Path(incomplete).expanduser()
    folder, prefix = (base, "") if incomplete.endswith("/") else (base.parent, base.name)
    shown = "" if str(folder) == "." and not incomplete.startswith("./") else (incomplete[: len(incomplete) - len(prefix)])
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.name.startswith(prefix) or (entry.name.startswith(".") and not prefix.startswith(".")):
            continue
        if entry.is_dir():
            out.append(f"{shown}{entry.name}/")
        elif entry.suffix in {".yaml", ".yml"}:
            out.append(f"{shown}{entry.name}")
    return out


def complete_model_dir(incomplete: str) -> list[str]:
    """Model dirs under runs/ (runs/<name>/model), then directories under the typed prefix."""
    found = [str(p.parent) for p in sorted(Path("runs").glob("*/model/config.json"))]
    hits = [f for f in found if f.startswith(incomplete)]
    base = Path(incomplete)
    folder, prefix = (base, "") if incomplete.endswith("/") or not incomplete else (base.parent, base.name)
    try:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and entry.name.startswith(prefix) and not entry.name.startswith("."):
                text = f"{entry}/" if incomplete else f"{entry.name}/"
                if text.rstrip("/") not in hits:
                    hits.append(text)
    except OSError:
        pass
    return hits
