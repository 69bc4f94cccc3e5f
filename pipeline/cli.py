"""The command-line runner of every entry point: a UserError becomes one paragraph and an exit status, never a
traceback; in a multi-process launch it is printed once per job and every rank exits with its code."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable, NoReturn

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.distributed.launch_env import LaunchEnv


def run_cli(main: Callable[..., int | None], launch_env: Callable[[], LaunchEnv] | None = None) -> None:
    """Run an entry point, turning UserError into a message and an exit status.

    With `launch_env` (LaunchEnv.from_environ), the process may be one rank of several: the environment is
    read here, once, and handed to main(env); an error every rank raises alike is printed by rank 0 only,
    and every rank exits with its code."""
    env: LaunchEnv | None = None
    try:
        if launch_env is None:
            code = main()
        else:
            env = launch_env()
            code = main(env)
    except UserError as err:
        multi = env is not None and env.multi_process
        if not (multi and err.shared and not env.is_main):
            where = f" (rank {env.rank})" if multi and not err.shared else ""
            print(f"{err.label}{where}: {err}", file=sys.stderr)
        leave(err.exit_code, multi)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        leave(130, env is not None and env.multi_process)
    except BrokenPipeError:  # `... | head`: the reader has gone; nothing left to say
        sys.stderr.close()
        sys.exit(141)
    leave(code or 0, env is not None and env.multi_process)


def leave(code: int, multi_process: bool = False) -> NoReturn:
    """Exit with `code`. A rank of a multi-process run skips the interpreter's teardown: everything it
    writes is written and closed by now, and in that teardown torch can destroy gloo's process group
    (still held by DDP) from a half-finalized interpreter, which aborts the process with
    'terminate called without an active exception' and turns a finished run into exit 1 (seen about
    once in 20 two-process runs here; pytorch/pytorch#190489, #179291)."""
    if multi_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
