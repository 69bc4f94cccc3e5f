"""Fault-injection points that a test arms through the environment; off in every normal run.

`PIPELINE_FAULT=checkpoint-write:40` makes the process SIGKILL itself while it writes the checkpoint
of step 40, after the weights and the optimizer state are on disk and before the state.json that
completes it: the moment a crash leaves a half-written checkpoint. A test can then check what the
README promises of such a crash, with the real write path, rather than a directory it made itself.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from pipeline.errors import ConfigError

FAULT_VAR = "PIPELINE_FAULT"
POINTS = ("checkpoint-write",)


@dataclass(frozen=True)
class FaultPoint:
    point: str
    step: int

    @classmethod
    def parse(cls, text: str | None) -> FaultPoint | None:
        if not text:
            return None
        point, _, step = text.partition(":")
        if point not in POINTS or not step.isdigit():
            raise ConfigError(f"{FAULT_VAR}={text}: expected one of {', '.join(POINTS)} followed by :STEP")
        return cls(point, int(step))

    def reached(self, point: str, step: int) -> None:
        if point == self.point and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
