"""docs/development.md's layout names every module of pipeline/ and nothing that is gone; the rooms stay small."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

MAX_FUNCTION_LINES = 60  # docstring included


def _layout_block() -> str:
    readme = (ROOT / "docs" / "development.md").read_text()
    section = readme[readme.index("## Layout\n"):]
    return section[section.index("```\n") + 4: section.index("\n```", section.index("```\n") + 4)]


def test_the_readme_layout_names_every_module_and_no_other():
    named = {"pipeline/" + m for m in re.findall(r"^  ([\w/]+\.py)\s", _layout_block(), re.MULTILINE)}
    actual = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    assert named == actual, f"missing from the README: {sorted(actual - named)}; gone from the code: {sorted(named - actual)}"


def test_no_function_in_pipeline_is_longer_than_sixty_lines():
    long = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


# The layers of pipeline/, lowest first, named by the first part of a module's path (pipeline/data/stream.py:
# "data"). A module imports its own layer and those below it, never one above.
LAYERS = (
    ("errors", "files", "inputs"),  # leaves: import nothing of pipeline/
    ("config", "faults", "sources"),
    ("data", "model", "model_conv", "model_card", "scoring", "checkpoints", "distributed", "tracking"),
    ("training",),
    ("inference", "kube", "cli", "tuning"),  # what launch/ runs
)
KNOWN_CYCLES: tuple[set[str], ...] = ()  # none: a cycle anywhere fails


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, is_package: bool, type_checking: bool) -> set[str]:
    """Every module name an import statement anywhere in `tree` names (module level and inside functions);
    the body of `if TYPE_CHECKING:` only with `type_checking`. `from a import b` names a.b."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
                for stmt in child.orelse:
                    visit_statement(stmt)
                continue
            visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
        visit(node)

    visit(tree)
    return names


def _import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """pipeline/'s modules (package __init__s included) -> the modules of pipeline/ each imports. A name is
    taken as the longest module of pipeline/ it starts with: `from pipeline.data import order` is an edge
    to pipeline.data.order, `from pipeline.tracking import Tracker` one to the package pipeline.tracking.
    The package a submodule's import runs first is no edge: pipeline/tracking/__init__.py re-exports Tracker
    from tracker.py, which imports its siblings through the package, and that is no circle."""
    paths = {_module_name(p): p for p in (ROOT / "pipeline").rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        edges = set()
        for name in _imported(ast.parse(path.read_text()), module, path.name == "__init__.py", type_checking):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name not in (module, "pipeline"):
                edges.add(name)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: each a set of modules that import each
    other, directly or round a circle."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    components = {frozenset({m} | {o for o in reachable[m] if m in reachable[o]}) for m in graph}
    return sorted((set(c) for c in components if len(c) > 1), key=sorted)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # pipeline/__init__.py
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), -1)


def test_the_import_graph_of_pipeline_has_no_cycle():
    """What runs: imports at module level and inside functions, `if TYPE_CHECKING:` left out."""
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles in pipeline/: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_annotations_add_no_cycle_but_the_known_one():
    """With the imports under `if TYPE_CHECKING:` too: what a reader must hold in mind at once."""
    cycles = _cycles(_import_graph(type_checking=True))
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles in pipeline/: " + "; ".join(" <-> ".join(sorted(c)) for c in new)
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"no longer a cycle, take it out of KNOWN_CYCLES: {gone}"


def test_no_module_imports_a_higher_layer():
    """TYPE_CHECKING imports included: an annotation that names a higher layer ties the module to it too."""
    graph = _import_graph(type_checking=True)
    unplaced = sorted(m for m in graph if _layer(m) == -1)
    assert not unplaced, f"place these in test_layout.LAYERS: {unplaced}"
    upward = sorted(f"{m} -> {dep}" for m, deps in graph.items() for dep in deps
                    if _layer(m) is not None and _layer(dep) is not None and _layer(dep) > _layer(m))
    assert not upward, f"imports up a layer (LAYERS in tests/test_layout.py): {upward}"


def test_errors_is_a_leaf():
    assert _import_graph(type_checking=True)["pipeline.errors"] == set()


# Rooms of the tests that are not rooms of pipeline/, and what they test.
TEST_ROOMS_ELSEWHERE: dict[str, str] = {}
HOUSE_TESTS = {"test_layout.py", "test_docs.py", "test_benchmarks.py", "test_launch_errors.py"}


def test_the_tests_of_a_room_live_in_a_folder_named_for_it():
    """tests/data/ holds the tests of pipeline/data/, tests/config/ those of pipeline/config.py; only the checks
    of the whole house (this file, the docs, the benchmarks, the entry points' errors) stand at the top."""
    rooms = {p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"}
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - rooms <= set(TEST_ROOMS_ELSEWHERE), f"test folders named for no room of pipeline/: {folders - rooms}"
    loose = {p.name for p in (ROOT / "tests").glob("test_*.py")} - HOUSE_TESTS
    assert not loose, f"put these in the folder of the room they test: {sorted(loose)}"
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test files of one name: pytest imports them by basename"
