"""The import layers: the op contract at the bottom, the FX passes above it, the runtime above
them. passes/ imports nothing of the runtime, nothing imports a top-level `passes` (it installs
as moeshard_compile.passes), the product imports no benchmark, and no modules import each other
in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"moeshard_compile": ROOT / "moeshard_compile", "moeshard_compile.passes": ROOT / "passes"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports, at its top or inside a function, resolved to a full name
    (a package's parents, which Python imports first, are not counted)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules or {base})  # a package's __init__ counts only where a name is its own
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_passes_import_nothing_of_the_runtime():
    for name, imported in _graph().items():
        if name.startswith("moeshard_compile.passes"):
            runtime = {m for m in imported if m.startswith("moeshard_compile") and not m.startswith("moeshard_compile.passes")}
            assert not runtime, f"{name} imports {sorted(runtime)}"


def test_nothing_imports_a_top_level_passes_or_a_benchmark():
    files = [*_modules().values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").rglob("*.py")]
    for path in files:
        name = "tests" if path.parent.name == "tests" else "x.y"
        for imported in _imports(name, path, {}):
            assert imported.split(".")[0] != "passes", f"{path.relative_to(ROOT)} imports {imported}"
            if path in _modules().values():
                assert imported.split(".")[0] != "bench", f"{path.relative_to(ROOT)} imports {imported}"


def test_no_import_circles():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for child in sorted(graph.get(name, ())):
            if child not in graph or child == name:
                continue
            assert state.get(child) != "open", "import circle: " + " -> ".join([*trail, name, child])
            if child not in state:
                visit(child, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
