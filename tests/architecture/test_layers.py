"""The repository's layer contract, checked over the import graph (every import statement, also those
inside functions and under TYPE_CHECKING: a lazy import is still a dependency).

The contract is written once, in the packages' docstrings, and read from there by this test:

- Between the repository's packages (grok_pacs <- export <- training <- devtools <- bench): each one's
  `__init__` docstring has a `May import:` sentence naming the packages it may use.
- Inside grok_pacs: each room (a sub-package, or a top-level module such as `config`) has a `May import:`
  sentence naming the rooms (or single modules) it may use, and may have a `Never:` sentence naming modules
  it may not use although their room is allowed. A wrong-way import fails naming both modules.
- Inside training: the layer table of training/__init__.py, lowest first.
- No import cycle between modules; no code outside tests/ imports test code.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "grok_pacs"
#: The repository's Python packages (each a folder with an `__init__.py` at the root).
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
DEVELOPMENT = ("training", "export", "devtools", "bench")  #: installed by dev/pyproject.toml, not in the wheel


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""


def _sentence(doc: str, lead: str) -> str | None:
    """The sentence of `doc` that starts with `lead`, up to its full stop (dots inside backticks are names)."""
    start = doc.find(lead)
    if start < 0:
        return None
    text, code = doc[start + len(lead) :], False
    for i, char in enumerate(text):
        if char == "`":
            code = not code
        elif char == "." and not code and (i + 1 == len(text) or text[i + 1].isspace()):
            return text[:i]
    return text


def _names(sentence: str | None) -> set[str]:
    """The module names written in backticks."""
    return set(re.findall(r"`([\w.]+)`", sentence or ""))


def _under(module: str, names: set[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(path): path for package in packages for path in sorted((ROOT / package).rglob("*.py"))}


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


_ALL = _modules(*PACKAGES)
#: module -> the modules it imports, for every module of the repository's packages.
REPO_GRAPH = {name: _imports(name, path, set(_ALL)) for name, path in _ALL.items()}
GRAPH = {name: targets for name, targets in REPO_GRAPH.items() if name.split(".")[0] == "grok_pacs"}


# --- between the repository's packages -------------------------------------------------------------------


def _package_contract(package: str) -> set[str] | None:
    sentence = _sentence(_docstring(ROOT / package / "__init__.py"), "May import:")
    return None if sentence is None else _names(sentence)


def test_every_package_has_a_contract_naming_packages():
    contracts = {package: _package_contract(package) for package in PACKAGES}
    assert set(PACKAGES) >= {"grok_pacs", *DEVELOPMENT}
    assert [p for p, names in contracts.items() if names is None] == [], "a package without a `May import:` sentence"
    assert {p: names - set(PACKAGES) for p, names in contracts.items() if names - set(PACKAGES)} == {}
    # The contract between packages is itself one-way: grok_pacs <- export <- training <- devtools <- bench.
    assert _cycle({p: names for p, names in contracts.items() if names is not None}) == []


def test_packages_import_only_the_packages_their_docstring_allows():
    contracts = {package: _package_contract(package) or set() for package in PACKAGES}
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in REPO_GRAPH.items()
        for target in targets
        if target.split(".")[0] in PACKAGES
        and target.split(".")[0] != source.split(".")[0]
        and not _under(target, contracts[source.split(".")[0]])
    )
    assert wrong == []


def test_the_runtime_imports_no_training_export_or_development_code():
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] in (*DEVELOPMENT, "tests")
    )
    assert wrong == []


# --- inside grok_pacs -------------------------------------------------------------------------------------


def _room(module: str) -> str:
    """`grok_pacs.jobs.tasks` -> `jobs`; `grok_pacs.config` -> `config`; `grok_pacs` -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _room_contract(room: str) -> tuple[set[str], set[str]] | None:
    """The modules a room may import and those it may never import, from its docstring (None: no contract)."""
    path = PACKAGE / room / "__init__.py" if (PACKAGE / room).is_dir() else PACKAGE / f"{room}.py"
    doc = _docstring(path)
    allowed = _sentence(doc, "May import:")
    if allowed is None and "imports nothing else from `grok_pacs`" in doc:
        allowed = ""  # domain's wording, kept: its docstring is part of every training step's cache key
    return None if allowed is None else (_names(allowed), _names(_sentence(doc, "Never:")))


ROOMS = {room: _room_contract(room) for room in sorted({_room(name) for name in GRAPH} - {""})}


def _allowed(source: str, target: str) -> bool:
    room, target_room = _room(source), _room(target)
    if target_room in ("", room):
        return True
    allowed, never = ROOMS[room]
    return not _under(target, never) and _under(target, allowed)


def test_every_room_has_a_contract():
    assert [room for room, contract in ROOMS.items() if contract is None] == [], (
        "a room whose docstring has no `May import:` sentence"
    )
    named = {name for contract in ROOMS.values() for name in contract[0]}
    assert [name for name in named if name != "grok_pacs" and _room(name) not in ROOMS] == [], (
        "a contract names no room"
    )


def test_rooms_import_only_the_layers_their_docstring_allows():
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] == "grok_pacs" and not _allowed(source, target)
    )
    assert wrong == []


# --- inside training --------------------------------------------------------------------------------------


def _training_layers() -> dict[str, int]:
    """training's sub-module -> its layer (0 = lowest), from the table in training/__init__.py's docstring: one
    layer a line indented by four, its modules in backticks (continuation lines are indented deeper)."""
    doc = _docstring(ROOT / "training" / "__init__.py")
    table = doc.split("Layers inside training", 1)[1].split("\n\n")[1]
    layers: dict[str, int] = {}
    level = -1
    for line in table.splitlines():
        level += bool(re.match(r" {4}\S", line))
        for name in re.findall(r"`(\w+)`", line):
            layers.setdefault(name, level)
    return layers


TRAINING_LAYERS = _training_layers()


def _training_room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_training_module_has_a_layer():
    children = {p.stem for p in (ROOT / "training").glob("*.py")} | {
        p.name for p in (ROOT / "training").iterdir() if (p / "__init__.py").is_file()
    }
    assert sorted(children - {"__init__", "__main__"} - set(TRAINING_LAYERS)) == []
    assert sorted(set(TRAINING_LAYERS) - children) == [], "the layer table names a module training does not have"
    assert TRAINING_LAYERS["manifest"] < TRAINING_LAYERS["stage1"] < TRAINING_LAYERS["stage2"]
    assert TRAINING_LAYERS["stage2"] < TRAINING_LAYERS["stage3"] < TRAINING_LAYERS["pipeline"]


def test_training_imports_only_its_own_layer_and_those_below():
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in REPO_GRAPH.items()
        if source.startswith("training.")
        for target in targets
        if target.startswith("training.")
        and _training_room(source) != _training_room(target)
        and TRAINING_LAYERS[_training_room(target)] > TRAINING_LAYERS[_training_room(source)]
    )
    assert wrong == []


# --- the graph as a whole ---------------------------------------------------------------------------------


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
    assert _cycle(REPO_GRAPH) == []


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
    # The benchmark -> calibration -> stage 3 loop of old would be a wrong-way import now.
    assert TRAINING_LAYERS["calibration"] < TRAINING_LAYERS["stage3"] < TRAINING_LAYERS["benchmark"]
    assert _sentence("May import: `a.b`, `c` (why). Never: `d`.", "May import:") == " `a.b`, `c` (why)"


def _test_module_names() -> set[str]:
    """Names under which test code can be imported: `tests`, and (should a folder lose its `__init__.py`) the
    bare names of its modules and folders; an area folder named like a real package (tests/training) is not one."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("*.py")} | {p.name for p in tests.rglob("*") if p.is_dir()}
    return {"tests", *(names - set(PACKAGES) - {"__pycache__"})}


def test_test_code_imports_as_tests_only():
    """Every test folder is a package, so pytest puts the repository root on sys.path (never a test folder):
    test modules in different areas may share a name, and a folder such as tests/training never hides training."""
    folders = {p.parent for p in (ROOT / "tests").rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


@pytest.mark.parametrize("folder", DEVELOPMENT)
def test_development_packages_use_no_test_code(folder):
    test_names = _test_module_names() - {"__init__"}
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        imported = _imports(_module_name(path), path, set())
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in imported if name.split(".")[0] in test_names]
        if '"tests"' in text or "'tests'" in text:
            wrong.append(f"{path.relative_to(ROOT)} names the tests folder (sys.path?)")
    assert wrong == []


# --- packaging --------------------------------------------------------------------------------------------


def _project(path: Path = ROOT / "pyproject.toml") -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


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


def test_the_development_packages_are_installed_from_the_checkout(tmp_path):
    """dev/pyproject.toml maps exactly the development packages; `make setup` installs them editable, so they
    import from any directory without a path set by hand."""
    dev = _project(ROOT / "dev" / "pyproject.toml")["tool"]["setuptools"]
    assert sorted(dev["packages"]) == sorted(DEVELOPMENT)
    assert {name: (ROOT / "dev" / folder).resolve() for name, folder in dev["package-dir"].items()} == {
        name: ROOT / name for name in DEVELOPMENT
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import training, export, devtools, bench, grok_pacs; print(training.__file__, bench.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(ROOT / "training" / "__init__.py"), str(ROOT / "bench" / "__init__.py")]


def test_no_code_edits_the_import_path():
    """Imports resolve through the installed packages, never through a path a script inserts."""
    edits = re.compile(r"sys\.path\s*(\.(insert|append|extend)\(|\[[^\]]*\]\s*=|\+=)")
    wrong = [
        str(path.relative_to(ROOT))
        for folder in (*PACKAGES, "tests", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if edits.search(path.read_text())
    ]
    assert wrong == []


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
    """A newcomer finds the room of a change from the tree: each room's docstring names all its modules (the
    rooms of grok_pacs, and the development packages themselves)."""
    unnamed = []
    folders = [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()] + [ROOT / d for d in DEVELOPMENT]
    for package in sorted(folders):
        doc = _docstring(package / "__init__.py")
        unnamed += [
            f"{package.relative_to(ROOT)}/{m.name}"
            for m in sorted(package.glob("*.py"))
            if m.stem not in ("__init__", "__main__") and f"`{m.stem}`" not in doc
        ]
    assert unnamed == [], "add each module, with what it owns, to its package's __init__ docstring"
