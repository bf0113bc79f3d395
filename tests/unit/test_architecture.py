"""The shape of the package, checked from its source so it does not drift back: no import cycles, no
module reaching into another's private names, tasks as plug-ins the stages reach only through the registry,
and nothing below the CLI importing it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "llmctl"
TASKS = ("lm", "classification", "instruct")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every llmctl import of a module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] == "llmctl":
                found += [(base, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == "llmctl"]
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the llmctl modules it imports (a `from package import module` counts as the module)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for base, imported, _ in _imports(name, path):
            target = f"{base}.{imported}" if imported and f"{base}.{imported}" in MODULES else base
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_the_package_has_no_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {imported} from {base}"
        for name, path in MODULES.items()
        for base, imported, line in _imports(name, path)
        if imported and imported.startswith("_") and not imported.startswith("__") and f"{base}.{imported}" not in MODULES
    ]
    assert private == []


def test_stages_reach_a_task_only_through_the_registry():
    # A stage engine that imported llmctl.tasks.classification would be a task branch in disguise.
    reaching = [
        f"{name} imports {base}"
        for name, path in MODULES.items() if not name.startswith("llmctl.tasks")
        for base, imported, _ in _imports(name, path)
        if any(f"{base}.{imported}".startswith(f"llmctl.tasks.{task}") or base.startswith(f"llmctl.tasks.{task}")
               for task in TASKS)
    ]
    assert reaching == []


def test_a_task_imports_no_other_task_but_the_language_model_it_builds_on():
    for task in TASKS:
        others = {t for t in TASKS if t != task} - ({"lm"} if task == "instruct" else set())
        for name, path in MODULES.items():
            if not name.startswith(f"llmctl.tasks.{task}"):
                continue
            for base, imported, _ in _imports(name, path):
                target = f"{base}.{imported}" if imported else base
                assert not any(target.startswith(f"llmctl.tasks.{other}") for other in others), (name, target)


def test_nothing_below_the_cli_imports_it():
    importers = [name for name, path in MODULES.items() if not name.startswith("llmctl.cli") and name != "llmctl.__main__"
                 for base, _, _ in _imports(name, path) if base.startswith("llmctl.cli")]
    assert importers == []


def test_every_task_is_registered_with_a_package_of_its_stages():
    from llmctl.tasks import STAGES, task_named, task_names

    for name in task_names():
        task = task_named(name)
        assert task.name == name and set(task.modules) <= set(STAGES)
        for stage, module in task.modules.items():
            assert module in MODULES, f"{name}'s {stage} stage names {module}, which does not exist"
