"""SIGTERM and SIGINT during a preparation: the clean-up runs and the user reads one line.

While a preparation runs, either signal raises `Signalled` wherever the main thread is. It is a
BaseException, like KeyboardInterrupt, so that no `except Exception` of a source reader takes it for bad
input; the build's clean-up sees it on its way out, and prepare() turns it into `Interrupted`, which
run_cli (pipeline/cli.py) prints as one line, exit 128 + the signal (143, 130). Only the first signal raises: a second one
(Ctrl-C pressed twice) must not cut the clean-up short. Inside `held()` (the swap, the clean-up) a
signal is only noted: a swap is never cut in half, and once the new data set is in place the run ends
as it would have. The trainer stops on SIGTERM by a flag read between steps
(pipeline/distributed/preemption.py); a preparation has no such steps, hence an exception.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from pipeline.errors import UserError


class Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Interrupted(UserError):
    """A preparation stopped by a signal; its message says what --out holds."""

    label = "prepare_data"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalGuard:
    """Context manager: SIGTERM and SIGINT raise `Signalled` inside it; the handlers before it come back after."""

    def __init__(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signums = signums
        self.received: int | None = None
        self._holding = 0
        self._previous: dict = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.signums}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        if not self._holding:
            raise Signalled(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
