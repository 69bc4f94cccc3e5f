"""One trial: an ordinary training run (launch/train.py in a process of its own), watched as it goes.

Each evaluation the run writes to its metrics.jsonl is reported to the trial at its step, and the
pruner asked; a trial it gives up on is stopped with SIGTERM, which the trainer answers with a
checkpoint. The worker beats a heartbeat into the study's storage while it watches, so that another
worker, on this machine or another, can tell a trial whose worker was lost (SIGKILL, a lost machine)
from one that is still running.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from pipeline.distributed.launcher import free_port
from pipeline.training.rundir import RESOLVED

GRACE_S = 60.0  # SIGTERM to SIGKILL: the trainer finishes its step and writes a checkpoint first
LOG_TAIL = 1500
BEAT_S = 10.0


@dataclass(frozen=True)
class TrialCommand:
    """How every run of a study starts: the user's config and overrides, and this worker's share of the machine."""

    config: str
    overrides: tuple[str, ...]
    study: str
    # launch/train.py beside the launch/tune.py that was started: found from the pipeline package it would be
    # in site-packages wherever the package is installed rather than run from a checkout (the image)
    script: Path
    threads: int  # per process
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of this worker's runs, one GPU a process
    processes: int = 1  # ranks of each run: DDP through accelerate launch (gloo on the CPU, NCCL on GPUs)
    mixed_precision: str = "no"

    def launcher(self) -> list[str]:
        """python, or accelerate launch with the run's ranks on this machine. The config's mixed precision is
        repeated so that the launcher neither warns about its default nor exports another to the ranks."""
        if self.processes == 1:
            return [sys.executable]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                "--num_processes", str(self.processes), "--main_process_port", str(free_port()),
                "--mixed_precision", self.mixed_precision, "--dynamo_backend", "no"]

    def argv(self, out: Path, params: list[str], resume: bool, name: str, final: bool = False) -> list[str]:
        """A trial never reads the test split (eval.score_test: false); a final run of the winner does, once."""
        role = ["wandb.job_type=tune-final"] if final else ["wandb.job_type=tune-trial", "eval.score_test=false"]
        args = [*self.launcher(), str(self.script), "--config", self.config, *self.overrides, *params, *role,
                f"output_dir={out}", f"train.cpu_threads={self.threads}", "train.progress_bar=false",
                "checkpoint.keep_last=1", f"wandb.group={self.study}", f"wandb.name={self.study}-{name}"]
        return args + (["--resume", "auto"] if resume else ["--overwrite"])

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.processes > 1:
            # The ranks run in sessions of their own, told of a SIGTERM by torch's elastic agent alone, which
            # kills them after this many seconds (30 by default): most of the tuner's grace, for the checkpoint.
            env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(GRACE_S - 10))
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        return env


@dataclass
class Outcome:
    state: str  # complete | pruned | failed | interrupted
    value: float | None = None
    loss: float | None = None
    error: str | None = None
    summary: dict = field(default_factory=dict)


GRID = 20  # a run's progress in twentieths: trials are compared, and pruned, at the same share of their runs


def planned_steps(out: Path) -> int | None:
    """A run's own length (resolved.yaml's train.max_steps, written before it trains); None until it is there."""
    try:
        return int(yaml.safe_load((out / RESOLVED).read_text())["train.max_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def progress(step: int, total: int) -> int:
    """The twentieths of a run of `total` steps done by `step`, rounded down (0..GRID): the first evaluation at
    or after each twentieth reports it, so trials that evaluate often or seldom are compared at the same share
    of their runs, give or take one of their evaluations."""
    return max(0, min(GRID, GRID * step // max(1, total)))


def evaluations(out: Path) -> list[tuple[int, float, float]]:
    """(step, accuracy, loss) of every evaluation in a run's metrics.jsonl so far, of the weights it ships
    (their average where train.ema is on); a line still being written ends the list."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            break
        key = "eval_ema" if "eval_ema/accuracy" in event else "eval"
        if f"{key}/accuracy" in event:
            found.append((int(event["step"]), float(event[f"{key}/accuracy"]), float(event[f"{key}/loss"])))
    return found


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: an orphan is then possible; the heartbeat still tells
        return None


# Looked up here, once: between fork and exec, in a process with threads, the child may only make bare calls
# (an import or a library load there can deadlock on a lock another thread held at the fork).
_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _end_with_the_tuner() -> None:
    """In the child, before exec: SIGTERM (a checkpoint, then exit) when the tuner's thread that started it
    dies, even by SIGKILL, instead of training on as an orphan no study will read."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text[-LOG_TAIL:].strip() or "(no output)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finished_run(out: Path, log: Path | None = None) -> Outcome:
    """A run that ended well, from its summary.json: the validation figures of the weights it kept (none where
    it evaluated nothing by design: a refit, eval.split none)."""
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("final_eval_accuracy") is None and summary.get("eval_split") != "none":
        return Outcome("failed", error=f"the run in {out} ended without an evaluation"
                       + (f"; its log {log} ends:\n{_tail(log)}" if log else ""))
    return Outcome("complete", summary["final_eval_accuracy"], summary["final_eval_loss"], summary=summary)


def _finished(proc: subprocess.Popen, out: Path, log: Path) -> Outcome:
    if proc.returncode == 0 and (out / "summary.json").is_file():
        return finished_run(out, log)
    tail = _tail(log)
    # A free port can be taken by another worker's launch before this run's ranks bind it: not the setting's
    # fault, so the trial is queued to run again (on a new port) instead of failing for good
    state = "interrupted" if "EADDRINUSE" in tail or "address already in use" in tail.lower() else "failed"
    return Outcome(state, error=f"the run exited {proc.returncode}; its log {log} ends:\n{tail}")


def watch(argv: list[str], env: dict[str, str], out: Path, log: Path, beat: Callable[[], None],
          report: Callable[[int, float], bool], stop: threading.Event, poll_s: float = 0.5) -> Outcome:
    """Run one training process to its end, reporting each new evaluation; `report(step, accuracy)`
    answers whether to prune. `stop` set: the run is stopped (it checkpoints) and the trial interrupted."""
    log.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    last_beat = 0.0
    with open(log, "ab") as sink:
        # A session of its own: a Ctrl-C at the terminal reaches the tuner, which stops its runs in order.
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_end_with_the_tuner)
        try:
            while True:
                if time.monotonic() - last_beat >= BEAT_S:
                    beat()
                    last_beat = time.monotonic()
                ended = proc.poll() is not None
                for step, accuracy, _ in evaluations(out):
                    if step not in seen:
                        seen.add(step)
                        if report(step, accuracy) and not ended:
                            _stop(proc)
                            return Outcome("pruned", accuracy, error=f"pruned at step {step}")
                if ended:
                    return _finished(proc, out, log)
                if stop.is_set():
                    _stop(proc)
                    return Outcome("interrupted", error=f"interrupted; its checkpoint is in {out}")
                time.sleep(poll_s)
        finally:
            _stop(proc)
