"""One node of a multi-node job: `accelerate launch`, with its failures in plain words.

`accelerate launch` reports a failed worker with a Python traceback of its own (torch's
ChildFailedError, through accelerate's launcher) after the worker has already said what went
wrong, and exits 1 whatever the worker's exit code was. The rendered pods run this instead: the
same arguments and the same launcher, in this process; the root-cause worker's exit code passed
on, so that the Job's podFailurePolicy can tell a bug (2) from a lost peer (75); and one line in
place of the traceback. The launcher's log line for a failed worker is dropped for the same
reason (the worker's own message and this line say it).

One option of its own, `--min_machines N`: an elastic job that goes on with as few as N of its
`--num_machines` (torchrun's `--nnodes N:MAX`, which accelerate launch cannot express); it
needs `--rdzv_backend c10d` and `--max_restarts` of 1 or more, as the rendered elastic pods have.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys

_WORKER_FAILED = "failed (exitcode"


def free_port() -> int:
    """A TCP port no process listens on now, for a rendezvous on this machine (one launch among others). Another
    process may still take it before the launcher binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DropWorkerFailure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _WORKER_FAILED not in record.getMessage()


MIN_MACHINES = "--min_machines"


def _pop_min_machines(argv: list[str]) -> tuple[int | None, list[str]]:
    """Our one option on top of accelerate launch's: the fewest machines an elastic job goes on with."""
    for i, arg in enumerate(argv):
        if arg == MIN_MACHINES and i + 1 < len(argv):
            return int(argv[i + 1]), argv[:i] + argv[i + 2:]
        if arg.startswith(MIN_MACHINES + "="):
            return int(arg.split("=", 1)[1]), argv[:i] + argv[i + 1:]
        if not arg.startswith("-") and arg.endswith(".py"):  # the training script: its own arguments follow
            break
    return None, argv


@contextlib.contextmanager
def _elastic_node_range(min_machines: int | None):
    """accelerate launch has no min:max form of --num_machines; torchrun's --nnodes does. Accelerate
    fills torchrun's arguments in prepare_multi_gpu_env, so the range is set right after it."""
    if min_machines is None:
        yield
        return
    import accelerate.commands.launch as accelerate_launch

    prepare = accelerate_launch.prepare_multi_gpu_env

    def with_range(args):
        env = prepare(args)
        args.nnodes = f"{min_machines}:{args.num_machines}"
        return env

    accelerate_launch.prepare_multi_gpu_env = with_range
    try:
        yield
    finally:
        accelerate_launch.prepare_multi_gpu_env = prepare


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # -9 (killed by SIGKILL) -> 137, as a shell reports it


def run_node(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    min_machines, argv = _pop_min_machines(argv)
    args = launch_command_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropWorkerFailure())
    try:
        with _elastic_node_range(min_machines):
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
