"""User-facing errors: one clear paragraph and an exit status, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt file).

    The message names the thing that is wrong and what to do about it.
    """

    exit_code = 1
    label = "error"


class ConfigError(UserError):
    exit_code = 2


class DataError(UserError):
    exit_code = 1


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point, turning UserError into a message and an exit status."""
    try:
        code = main()
    except UserError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        leave(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        leave(130)
    except BrokenPipeError:  # `... | head`: the reader has gone; nothing left to say
        sys.stderr.close()
        sys.exit(141)
    leave(code or 0)


def leave(code: int) -> NoReturn:
    """Exit with `code`. A rank of a multi-process run skips the interpreter's teardown: everything it
    writes is written and closed by now, and in that teardown torch can destroy gloo's process group
    (still held by DDP) from a half-finalized interpreter, which aborts the process with
    'terminate called without an active exception' and turns a finished run into exit 1 (seen about
    once in 20 two-process runs here; pytorch/pytorch#190489, #179291)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
