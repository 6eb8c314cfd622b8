"""The layer contract of grok_pacs, checked over the import graph (every import statement, also those
inside functions and under TYPE_CHECKING: a lazy import is still a dependency).

- Each sub-package imports only the packages its `__init__` docstring allows (ALLOWED below mirrors them,
  lowest layer first as drawn in grok_pacs/__init__.py); a wrong-way import fails naming both modules.
- No import cycle between modules.
- Nothing in grok_pacs imports `training`, `export`, `devtools`, `tests` or `bench`; the runtime wheel
  ships none of them.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grok_pacs"
NOT_RUNTIME = ("training", "export", "devtools", "tests", "bench")

_BASE = {"config", "domain"}
#: sub-package (or top-level module) -> the grok_pacs rooms it may import (a room: "dicom", or one module
#: of a room: "analysis.result").
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "secret_files": set(),
    "config": {"domain", "secret_files"},
    "dicom": _BASE,
    "ops": _BASE,
    "model": _BASE,
    "store": _BASE | {"dicom", "ops"},
    "analysis": _BASE | {"dicom", "model", "ops"},
    "ingest": _BASE | {"dicom", "store", "ops"},
    "report": _BASE | {"dicom", "analysis"},
    "delivery": _BASE | {"dicom", "store", "ops"},
    "jobs": _BASE | {"dicom", "ops", "store", "model", "ingest", "analysis", "report", "delivery"},
    "cli": _BASE | {"dicom", "ops", "store", "model", "ingest", "analysis", "report", "delivery", "jobs"},
}
#: modules a room may not import although it may import their room (the heavy engine stays in workers).
FORBIDDEN = {"report": {"analysis.engine", "analysis.onnx_session"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Absolute names of the modules `name` imports (a `from m import x` names m.x when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def _room(module: str) -> str:
    """`grok_pacs.jobs.tasks` -> `jobs`; `grok_pacs.config` -> `config`; `grok_pacs` -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _allowed(source: str, target: str) -> bool:
    room, target_room = _room(source), _room(target)
    if target_room in ("", room):
        return True
    tail = target.split(".", 1)[1]
    if any(tail == bad or tail.startswith(bad + ".") for bad in FORBIDDEN.get(room, ())):
        return False
    return any(tail == ok or tail.startswith(ok + ".") for ok in ALLOWED[room])


def test_every_room_has_a_contract():
    rooms = {_room(name) for name in GRAPH} - {""}
    assert rooms == set(ALLOWED), "a sub-package without a layer contract (or a contract without a package)"


def test_rooms_import_only_the_layers_their_docstring_allows():
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] == "grok_pacs" and not _allowed(source, target)
    )
    assert wrong == []


def test_the_runtime_imports_no_training_export_or_development_code():
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] in NOT_RUNTIME
    )
    assert wrong == []


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] (iterative DFS, colours: 1 on the stack, 2 done)."""
    colour: dict[str, int] = {}
    for start in graph:
        if colour.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if nxt not in graph:
                continue
            if colour.get(nxt) == 1:
                path = [name for name, _ in stack]
                return path[path.index(nxt) :] + [nxt]
            if not colour.get(nxt):
                colour[nxt] = 1
                stack.append((nxt, sorted(graph[nxt])))
    return []


def test_no_import_cycles():
    assert _cycle(GRAPH) == []


@pytest.mark.parametrize(
    "source, target, expected",
    [
        ("grok_pacs.ingest.service", "grok_pacs.jobs.publisher", False),  # ingest below jobs
        ("grok_pacs.jobs.worker", "grok_pacs.cli.main", False),  # runtime never imports the CLI
        ("grok_pacs.report.sr", "grok_pacs.analysis.result", True),
        ("grok_pacs.report.sr", "grok_pacs.analysis.engine", False),
        ("grok_pacs.analysis.engine", "grok_pacs.store.index", False),
        ("grok_pacs.cli.jobs", "grok_pacs.jobs.serve", True),
    ],
)
def test_the_checker_tells_right_from_wrong(source, target, expected):
    assert _allowed(source, target) is expected
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _test_module_names() -> set[str]:
    """Names under which test code can be imported: tests' own modules and packages, and `tests`."""
    tests = ROOT / "tests"
    return {"tests", *(p.stem for p in tests.glob("*.py")), *(p.name for p in tests.iterdir() if p.is_dir())}


@pytest.mark.parametrize("folder", ["bench", "devtools"])
def test_benchmarks_and_devtools_use_no_test_code(folder):
    test_names = _test_module_names() - {"__init__"}
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        imported = _imports(_module_name(path), path, set())
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in imported if name.split(".")[0] in test_names]
        if '"tests"' in text or "'tests'" in text:
            wrong.append(f"{path.relative_to(ROOT)} names the tests folder (sys.path?)")
    assert wrong == []


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_wheel_ships_the_runtime_only_with_runtime_dependencies():
    import setuptools

    project = _project()
    find = project["tool"]["setuptools"]["packages"]["find"]
    assert {name.split(".")[0] for name in setuptools.find_packages(str(ROOT), include=find["include"])} == {
        "grok_pacs"
    }
    runtime = {_distribution_name(req) for req in project["project"]["dependencies"]}
    assert not runtime & {"tqdm", "matplotlib", "pyyaml", "httpx", "gguf", "onnx", "onnxscript", "pytest"}


def test_every_library_the_runtime_imports_is_a_runtime_dependency():
    from importlib.metadata import packages_distributions

    runtime = {_distribution_name(req) for req in _project()["project"]["dependencies"]}
    providers = packages_distributions()
    third_party = {
        target.split(".")[0]
        for targets in GRAPH.values()
        for target in targets
        if target
        and target.split(".")[0] not in sys.stdlib_module_names
        and target.split(".")[0] not in ("grok_pacs", "__future__")
    }
    missing = sorted(
        name for name in third_party if not {_distribution_name(dist) for dist in providers.get(name, [])} & runtime
    )
    assert missing == [], "imported by grok_pacs but only installed through an extra (or not at all)"


def test_every_module_is_named_in_its_rooms_docstring():
    """A newcomer finds the room of a change from the tree: each room's docstring names all its modules."""
    unnamed = []
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        unnamed += [
            f"{package.name}/{m.name}"
            for m in sorted(package.glob("*.py"))
            if m.stem not in ("__init__", "__main__") and f"`{m.stem}`" not in doc
        ]
    assert unnamed == [], "add each module, with what it owns, to its package's __init__ docstring"
