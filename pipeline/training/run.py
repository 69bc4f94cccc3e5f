"""One training run as a process sees it: the output_dir's check and lease, the peer watch and SIGTERM
around the run (built once by trainer.py), and what each way of ending means for the exit code, the W&B
run and the lease."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pipeline.config import Config
from pipeline.distributed.agreement import on_main
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.distributed.lease import OutputLease
from pipeline.distributed.peers import PeerWatch
from pipeline.distributed.preemption import Preempted, StopSignal
from pipeline.errors import ConfigError, UserError
from pipeline.training import rundir
from pipeline.training.accelerator import build_accelerator
from pipeline.training.parts import DataPlan, Run, say
from pipeline.training.rundir import AlreadyComplete
from pipeline.training.trainer import build_run, train_run


def claim_output_dir(cfg: Config, env: LaunchEnv, accelerator: Accelerator, data: DataPlan, resume: str | None,
                     overwrite: bool, leases: list[OutputLease]) -> dict[str, Any] | None:
    """Collective, once the run's length is known and before anything is written to output_dir: the main
    process looks at what the directory holds (pipeline/training/rundir.py) and refuses it, or takes its
    lease, marks it as this pipeline's run and, with --overwrite, clears the earlier run's outputs. Every
    rank learns the outcome, so a refused run ends on all ranks alike. The lease goes into `leases`, for
    the caller to give back however the run ends. Returns the summary of a finished run this start
    resumes (the trainer stops there if no step is left), else None."""
    out = Path(cfg.output_dir)
    asked = (f"train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps is not None
             else f"train.epochs={cfg.train.epochs} ({data.total_steps} steps)")

    def take() -> dict[str, Any] | None:
        lease = OutputLease(out, cfg.train.lease_timeout_s, env.job_identity())
        found = rundir.inspect(out)
        lease.refuse_if_busy()  # a live run in there is named as such, whatever its files say
        rundir.decide(found, resume, overwrite, data.total_steps, asked)
        warning = lease.acquire()
        leases.append(lease)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        rundir.mark(out, replace=overwrite and found.kind == "run", log=lambda line: say(accelerator, line))
        return found.summary if found.finished and resume else None

    def unusable(err: OSError) -> UserError:
        return UserError(f"output_dir {out} is not writable ({err.strerror or err}); choose another output_dir or fix "
                         "its permissions or volume mount")

    return on_main(accelerator, take, unusable)


def train(cfg: Config, env: LaunchEnv, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train to the end (or to train.stop_at_step, or a SIGTERM); returns the summary on the main process.
    `env` is the launch as the entry point read it; `overwrite` replaces a run already in output_dir (never
    files the pipeline did not write)."""
    if overwrite and resume:
        raise ConfigError(f"--overwrite replaces the run in output_dir {cfg.output_dir} and --resume {resume} "
                          "continues it: give one of them")
    accelerator = build_accelerator(cfg, env)
    run: Run | None = None
    watch = PeerWatch.start(accelerator, cfg.train.peer_timeout_s, lambda: where_it_stopped(run), env)
    stop = StopSignal()
    leases: list[OutputLease] = []
    exit_code, preempted = 1, False
    try:
        run = build_run(cfg, env, accelerator, resume,
                        claim=lambda data: claim_output_dir(cfg, env, accelerator, data, resume, overwrite, leases))
        summary = train_run(run, stop)
        exit_code = 0
        _end_cleanly(watch)
        return summary
    except AlreadyComplete as done:
        if accelerator.is_main_process:
            print(f"[train] {done}", flush=True)
        exit_code = 0
        _end_cleanly(watch)
        return done.summary
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
        if run is not None:
            run.tracker.finish(exit_code, preempted=preempted)
        for lease in leases:
            lease.release()


def _end_cleanly(watch: PeerWatch | None) -> None:
    """A run that succeeded: the peers sign off, then the process group goes."""
    if watch is not None:
        watch.stop(done=True)
        watch.sign_off()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def where_it_stopped(run: Run | None) -> str:
    """For a lost-peer message, from the watch's thread: the step reached and what a resume starts from."""
    if run is None:
        return "stopped before training began."
    newest = run.checkpointer.latest()
    return (f"stopped at step {run.state.step} of {run.total_steps}; the newest checkpoint is "
            f"{newest or 'none yet (the job would start over)'}.")
