"""One training run as a process sees it: the output_dir's lease, the peer watch and SIGTERM around
the Trainer, and what each way of ending means for the exit code, the W&B run and the lease."""

from __future__ import annotations

import sys
from typing import Any

import torch
from accelerate import Accelerator

from pipeline.config import Config
from pipeline.distributed.agreement import on_main
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.distributed.lease import OutputLease
from pipeline.distributed.peers import PeerWatch
from pipeline.distributed.preemption import Preempted, StopSignal
from pipeline.errors import UserError
from pipeline.training.accelerator import build_accelerator
from pipeline.training.trainer import Trainer


def take_output_lease(accelerator: Accelerator, cfg: Config, env: LaunchEnv) -> OutputLease | None:
    """Collective: the main process takes output_dir's lease before anything is written there;
    every rank learns whether it got it, so a refused run ends on all ranks at once."""
    taken: list[OutputLease] = []

    def take() -> None:
        lease = OutputLease(cfg.output_dir, cfg.train.lease_timeout_s, env.job_identity())
        warning = lease.acquire()
        taken.append(lease)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    def unwritable(err: OSError) -> UserError:
        return UserError(f"output_dir {cfg.output_dir} is not writable ({err.strerror or err}); choose another "
                         "output_dir or fix its permissions or volume mount")

    on_main(accelerator, take, unwritable)
    return taken[0] if taken else None


def train(cfg: Config, resume: str | None = None, env: LaunchEnv | None = None) -> dict[str, Any]:
    """Train to the end (or to train.stop_at_step, or a SIGTERM); returns the summary on the main process."""
    env = env or LaunchEnv.from_environ()
    accelerator = build_accelerator(cfg, env)
    trainer: Trainer | None = None
    watch = PeerWatch.start(accelerator, cfg.train.peer_timeout_s, lambda: where_it_stopped(trainer), env)
    stop = StopSignal()
    lease, exit_code, preempted = None, 1, False
    try:
        lease = take_output_lease(accelerator, cfg, env)
        trainer = Trainer(cfg, resume, accelerator, env)
        summary = trainer.run(stop)
        exit_code = 0
        if watch is not None:
            watch.stop(done=True)
            watch.sign_off()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return summary
    except Preempted as err:
        exit_code, preempted = err.exit_code, True
        raise
    except Exception as err:
        lost = watch.explain(err) if watch is not None else None
        if lost is None:
            raise
        exit_code = lost.exit_code
        raise lost from None
    finally:
        if watch is not None:
            watch.stop(done=False)  # no-op after a success
        stop.restore()
        if trainer is not None:
            trainer.tracker.finish(exit_code, preempted=preempted)
        if lease is not None:
            lease.release()


def where_it_stopped(trainer: Trainer | None) -> str:
    """For a lost-peer message, from the watch's thread: the step reached and what a resume starts from."""
    if trainer is None:
        return "stopped before training began."
    newest = trainer.checkpointer.latest()
    return (f"stopped at step {trainer.state.step} of {trainer.total_steps}; the newest checkpoint is "
            f"{newest or 'none yet (the job would start over)'}.")
