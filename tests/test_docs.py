"""The README and docs/ cannot drift from the code: every file they name exists, every flag they pass
to one of our scripts is one its --help lists, every config key they name is in the schema, every
`make` target is in the Makefile, and every docs page starts with a runnable example."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import ROOT
from pydantic import BaseModel

from pipeline.config import Config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = tuple(Config.model_fields)
FILE_SUFFIXES = (".py", ".json", ".jsonl", ".yaml", ".safetensors", ".png", ".npy", ".npz", ".csv", ".md", ".tar", ".ts")
PATH = re.compile(r"(?<![\w/.-])((?:configs|launch|benchmarks|pipeline|tests|k8s|docs|\.ci)/[\w/.-]*[\w])(?![\w*-])")
OUTPUT = re.compile(r"--(?:out|json) (\S+)")  # what a command writes need not exist yet
SCRIPT = re.compile(r"(?:launch|benchmarks)/[\w]+\.py")
KEY = re.compile(r"(?<![\w/.-])(" + "|".join(SECTIONS) + r")\.([a-z_]+)(?:\.([a-z_]+))?(?![\w/-])")


def _text(page: Path) -> str:
    return page.read_text()


def _commands(text: str) -> list[str]:
    """Shell lines of the page's code blocks (bash, sh or unmarked) and inline code, continuation lines joined.
    Fences are paired line by line: a closing fence is never read as the opening of a block of prose."""
    lines, kind = [], None
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            kind = line.lstrip()[3:].strip() if kind is None else None
        elif kind in ("bash", "sh", ""):
            lines.append(line)
    return lines + re.findall(r"`([^`\n]*(?:launch|benchmarks)/\w+\.py[^`\n]*)`", text)


@lru_cache(maxsize=None)
def _help(script: str, sub: str = "") -> str:
    args = [sys.executable, str(ROOT / script), *([sub] if sub else []), "--help"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


def _key_exists(section: str, key: str, sub: str | None) -> bool:
    model = Config.model_fields[section].annotation
    fields = getattr(model, "model_fields", {})
    if key not in fields:
        return False
    if sub is None:
        return True
    inner = fields[key].annotation
    inner = next((a for a in getattr(inner, "__args__", (inner,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return inner is not None and sub in inner.model_fields


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_named_file_exists(page):
    written = set(OUTPUT.findall(_text(page)))
    missing = sorted({p for p in PATH.findall(_text(page)) if not (ROOT / p).exists() and p not in written})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_key_is_in_the_schema(page):
    unknown = set()
    for span in re.findall(r"`([^`\n]+)`", _text(page)) + _commands(_text(page)):
        for match in KEY.finditer(span):
            whole = match.group(0)
            if whole.endswith(FILE_SUFFIXES) or not _key_exists(*match.groups()):
                if not whole.endswith(FILE_SUFFIXES):
                    unknown.add(whole)
    assert not unknown, f"{page.name} names config keys the schema does not have: {sorted(unknown)}"


def test_every_flag_passed_to_our_scripts_is_one_they_take():
    uses: list[tuple[str, str, str, str]] = []  # page, script, subcommand, flag
    for page in PAGES:
        for line in _commands(_text(page)):
            for m in SCRIPT.finditer(line):
                rest = line[m.end():].split("#")[0].split("|")[0].split("&&")[0].split(";")[0].split()
                sub = rest[0] if m.group(0) == "launch/submit.py" and rest and rest[0] in ("status", "logs", "delete") else ""
                uses += [(page.name, m.group(0), sub, re.sub(r"=.*", "", t)) for t in rest if t.startswith("--")]
    assert uses, "no command found: the pattern is broken"
    scripts = sorted({(s, sub) for _, s, sub, _ in uses})
    missing_scripts = [s for s, _ in scripts if not (ROOT / s).is_file()]
    assert not missing_scripts, missing_scripts
    with ThreadPoolExecutor(max_workers=2) as pool:
        helps = dict(zip(scripts, pool.map(lambda a: _help(*a), scripts), strict=True))
    unknown = sorted({(p, s, f) for p, s, sub, f in uses if f != "--help" and not re.search(rf"{re.escape(f)}\b", helps[(s, sub)])})
    assert not unknown, f"flags the scripts do not take (page, script, flag): {unknown}"


# Flags of other tools that the pages mention in passing.
EXTERNAL_FLAGS = {"--from-literal": "kubectl create secret", "--nnodes": "torchrun", "--read-only": "podman", "--cpus": "podman run",
                  "--user": "pip install"}


def test_every_flag_the_prose_names_is_one_that_exists():
    """A flag in inline code, wherever it stands, is one of our scripts', accelerate launch's, or a known tool's."""
    scripts = sorted({(p.relative_to(ROOT).as_posix(), "") for p in (ROOT / "launch").glob("*.py")}
                     | {("launch/submit.py", sub) for sub in ("status", "logs", "delete")}
                     | {(m, "") for page in PAGES for m in SCRIPT.findall(_text(page)) if m.startswith("benchmarks/")})
    with ThreadPoolExecutor(max_workers=2) as pool:
        helps = "\n".join(pool.map(lambda a: _help(*a), scripts))
    helps += subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--help"], capture_output=True,
                            text=True, timeout=300).stdout
    named = {(page.name, f) for page in PAGES for span in re.findall(r"`([^`\n]+)`", _text(page))
             for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span)}
    unknown = sorted((p, f) for p, f in named if f not in EXTERNAL_FLAGS and not re.search(rf"{re.escape(f)}\b", helps))
    assert not unknown, f"flags no script takes (page, flag): {unknown}"


def test_every_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    spans = [s for page in PAGES for s in re.findall(r"`([^`\n]+)`", _text(page)) + _commands(_text(page))]
    named = {t for span in spans for t in re.findall(r"(?<![\w-])make ([a-z][\w-]*)", span)}
    assert named and named <= targets, f"make targets the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_each_page_starts_with_a_runnable_example(page):
    lines = _text(page).splitlines()
    assert lines[0].startswith("# ") and lines[2] == "```bash", f"{page.name}: a title, then a bash block"
    first = lines[3]
    assert first.startswith((".venv/bin/", "make ", "source .venv", "accelerate")), first


def test_the_readme_stays_a_front_page():
    readme = _text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 150
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= set(re.findall(r"\((docs/[\w-]+\.md)\)", readme))


TEST_REF = re.compile(r"`(?:tests/)?((?:\w+/)?test_\w+\.py)((?:::\w+)?)`|`::(\w+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_named_test_exists(page):
    """A row that says which test holds it names a test that is there: `tests/room/test_x.py::name`, or
    `::name` after one in the same cell, which names a test of that file."""
    missing, current = [], None
    for match in TEST_REF.finditer(_text(page)):
        file, name, same_file = match.groups()
        if file:
            current = ROOT / "tests" / file
            if not current.is_file():
                missing.append(file)
                continue
        name = (name or "").removeprefix("::") or same_file
        if name and (current is None or not re.search(rf"^def {name}\(", current.read_text(), re.M)):
            missing.append(f"{current.name if current else '?'}::{name}")
    assert not missing, f"{page.name} names tests that do not exist: {missing}"
