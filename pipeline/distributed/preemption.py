"""Graceful stop on SIGTERM (Kubernetes preemption, `kubectl delete`, torchrun's shutdown).

The handler only sets a flag. After each optimizer step every rank contributes its flag to
an all-reduce, so all ranks stop after the same step even when the signal reached them at
different moments; the trainer then writes that step's checkpoint and exits 143 (128+15).
torchrun's agent SIGKILLs its workers 30 s after forwarding SIGTERM; a step plus a
checkpoint of this model takes well under a second.
"""

from __future__ import annotations

import signal

from pipeline.distributed.agreement import any_rank
from pipeline.errors import UserError


class Preempted(UserError):
    exit_code = 128 + signal.SIGTERM
    label = "stopped"
    shared = True  # every rank stops after the same step


class StopSignal:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, accelerator) -> bool:
        """True on every rank as soon as any rank got the signal (collective: call on all ranks)."""
        return any_rank(accelerator, self.received is not None)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
