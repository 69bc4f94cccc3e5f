"""User-facing errors: one clear paragraph and an exit status, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable


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
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... | head`: the reader has gone; nothing left to say
        sys.stderr.close()
        sys.exit(141)
    sys.exit(code or 0)
