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
