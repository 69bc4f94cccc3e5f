"""One node of a multi-node job: `accelerate launch`, with its failures in plain words.

`accelerate launch` reports a failed worker with a Python traceback of its own (torch's
ChildFailedError, through accelerate's launcher) after the worker has already said what went
wrong, and exits 1 whatever the worker's exit code was. The rendered pods run this instead: the
same arguments and the same launcher, in this process; the root-cause worker's exit code passed
on, so that the Job's podFailurePolicy can tell a bug (2) from a lost peer (75); and one line in
place of the traceback. The launcher's log line for a failed worker is dropped for the same
reason (the worker's own message and this line say it).
"""

from __future__ import annotations

import logging
import subprocess
import sys

_WORKER_FAILED = "failed (exitcode"


class _DropWorkerFailure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _WORKER_FAILED not in record.getMessage()


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # -9 (killed by SIGKILL) -> 137, as a shell reports it


def run_node(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    args = launch_command_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropWorkerFailure())
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: accelerate's simple launcher
        print(f"node: training exited with code {_exit_code(err.returncode)}; its message, if it left one, is above",
              file=sys.stderr, flush=True)
        return _exit_code(err.returncode)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = _exit_code(failure.exitcode)
        how = f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0 else f"exited with code {code}"
        print(f"node: training rank {rank} {how}; its message, if it left one, is above", file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        print(f"node: stopped by signal {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except RendezvousError as err:
        print(f"node: the rendezvous with the other nodes failed ({type(err).__name__}: {err}); check that pod 0 "
              "is running and reachable on the rendezvous port", file=sys.stderr, flush=True)
        return 1
    except DistError as err:  # the static rendezvous store could not be reached
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"node: the rendezvous with the other nodes failed ({first}); check that pod 0 is running and "
              "reachable on the rendezvous port", file=sys.stderr, flush=True)
        return 1
    return 0
