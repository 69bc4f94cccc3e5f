"""Driving real training processes from tests: start, watch the metrics, find ranks, kill."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from conftest import ROOT, read_jsonl


def start_session(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # Own session: the test can signal the launcher like a kubelet does, and clean up the whole tree.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if metrics.is_file() and any(e["step"] >= step for e in read_jsonl(metrics)[-3:]):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _is_train(proc: psutil.Process) -> bool:
    return any(arg.endswith("launch/train.py") for arg in proc.cmdline())


def train_ranks(launcher_pid: int, count: int, timeout: float = 60) -> list[int]:
    """PIDs of the training ranks under a launcher, once `count` of them run. torchrun starts them
    in sessions of their own, so follow parent links; DataLoader workers (forks of a rank) are left out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = []
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                parent = child.parent()
                # A rank's parent is the launcher (its command line names the script too) or not a trainer.
                if _is_train(child) and (parent.pid == launcher_pid or not _is_train(parent)):
                    ranks.append(child.pid)
            except psutil.Error:  # exited while we looked
                continue
        if len(ranks) >= count:
            return sorted(ranks)
        time.sleep(0.1)
    raise AssertionError(f"{count} training ranks did not start under process {launcher_pid}")
