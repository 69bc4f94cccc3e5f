"""A test-only pause at a phase of a preparation, armed through the environment; off in every normal run.

`PIPELINE_FAULT=prepare-pause:shards` makes launch/prepare_data.py print a marker line on stdout and
wait for a line on stdin once it reaches that phase, so that a test can send a signal, kill it or fill
its disk at a known moment of the real code path (pipeline/faults.py arms the trainer's points alike):

    staging   the first cases are staged, more may follow
    shards    the first shard is written, the others are not
    manifest  the new data set is complete beside --out, before the swap
    renamed   the swap by two renames (forced, as where the filesystem cannot exchange), between them:
              --out is missing for that moment
    swapped   --out holds the new data set, the earlier one is not yet removed
"""

from __future__ import annotations

import os
import sys

from pipeline.faults import FAULT_VAR

PHASES = ("staging", "shards", "manifest", "renamed", "swapped")
_PREFIX = "prepare-pause:"
_reached: set[str] = set()  # each phase pauses once, where it is reached again and again (staging)


def _armed() -> str | None:
    text = os.environ.get(FAULT_VAR, "")
    return text[len(_PREFIX):] if text.startswith(_PREFIX) else None


def pause(phase: str) -> None:
    if _armed() == phase and phase not in _reached:
        _reached.add(phase)
        print(f"fault: prepare paused at {phase} (pid {os.getpid()}); a line on stdin resumes it", flush=True)
        sys.stdin.readline()


def forced_renames() -> bool:
    """The `renamed` pause is in the fallback swap: arming it takes that path."""
    return _armed() == "renamed"
