"""Real containers for the node tests: the image, jobs played by `submit.py --local`, and faults.

A job here is what a user runs: `launch/submit.py ... --local`, its pods on a podman network of
their own, each with its own network stack, hostname and filesystem; the shared output claim is
a host directory. Faults are done to those pods from outside, as a cluster would suffer them:
a pod killed (every process in it, and its network namespace, gone at once) or its link cut
(the pod's interface down inside its own network namespace: its packets vanish, nothing is closed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import ROOT, read_jsonl

from pipeline.kube import local
from pipeline.kube.podman import podman_env

# In a container log of a successful job, none of these may appear.
DIRTY = re.compile(r"Traceback|^\s+File \"|\bError\b|error:|^E\d{4} |terminate called|exit barrier", re.MULTILINE)


def require_podman() -> None:
    """Skip where containers cannot run; CI sets PIPELINE_REQUIRE_CONTAINERS=1, and there a skip is a failure."""
    problem = None
    if shutil.which("podman") is None:
        problem = "podman is not installed (make test installs it as root with apt)"
    elif os.geteuid() != 0:
        problem = "the container tests run pods with their own network stacks, which needs root"
    if problem:
        if os.environ.get("PIPELINE_REQUIRE_CONTAINERS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


@dataclass
class Job:
    """One job played locally; `out` is the host directory behind its output claim."""

    name: str
    image: str
    shards: Path
    out: Path
    overrides: list[str]
    extra: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return self.out / self.name  # the pods write to /outputs/<job name>

    def submit(self, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "launch/submit.py", "--config", "configs/cpu_test.yaml", "--nodes", "2",
               "--gpus-per-node", "0", "--image", self.image, "--name", self.name, "--data-pvc", f"{self.name}-data",
               "--output-pvc", f"{self.name}-out", "--local", "--local-volume", f"{self.name}-data={self.shards}",
               "--local-volume", f"{self.name}-out={self.out}", *self.extra, *self.overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"submit exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def delete(self) -> None:
        subprocess.run([sys.executable, "launch/submit.py", "delete", self.name, "--local"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)

    def forget(self) -> None:
        """Everything the job left on this machine, claims included."""
        self.delete()
        podman("volume", "rm", "--force", f"{self.name}-data", f"{self.name}-out", check=False)

    def states(self) -> list[local.PodState]:
        return local.pod_states(self.name)

    def log(self, index: int, container: str = "trainer") -> str:
        proc = podman("logs", f"{self.name}-{index}-{container}", check=False)
        return proc.stdout + proc.stderr

    def logs(self) -> str:
        return "\n".join(f"--- pod {i} {c}\n{self.log(i, c)[-5000:]}" for i in range(2) for c in ("preflight", "trainer"))

    def wait(self, timeout: float, indexes: tuple[int, ...] = (0, 1)) -> dict[int, int]:
        """Exit codes of the trainers of `indexes` once they have all exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {s.rank: s for s in self.states()}
            if all(i in states and states[i].exit_code is not None for i in indexes):
                return {i: states[i].exit_code for i in indexes}
            time.sleep(0.5)
        raise AssertionError(f"job {self.name} did not end within {timeout:.0f} s\n{self.logs()}")

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        metrics = self.output_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metrics.is_file() and any(e["step"] >= step for e in read_jsonl(metrics)[-3:]):
                return
            if any(s.exit_code is not None for s in self.states()):
                raise AssertionError(f"job {self.name} ended before step {step}\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"job {self.name} reached no step {step} within {timeout} s\n{self.logs()}")

    def finished_at(self, index: int) -> float:
        """When the trainer container of pod `index` exited, by podman's clock (seconds since the epoch):
        reaction times taken from these do not count the podman commands a loaded host runs slowly."""
        raw = podman("container", "inspect", f"{self.name}-{index}-trainer", "--format", "{{.State.FinishedAt}}").stdout
        stamp = re.match(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(\.\d+)?", raw.strip())
        assert stamp, f"podman gave no exit time for {self.name}-{index}-trainer: {raw!r}"
        whole = datetime.fromisoformat(stamp.group(1).replace(" ", "T")).replace(tzinfo=timezone.utc)
        return whole.timestamp() + float(stamp.group(2) or 0)

    def env(self, index: int) -> dict[str, str]:
        raw = podman("container", "inspect", f"{self.name}-{index}-trainer", "--format", "{{json .Config.Env}}").stdout
        return dict(item.split("=", 1) for item in json.loads(raw))

    # -- faults ----------------------------------------------------------------------------

    def kill_pod(self, index: int) -> None:
        """The pod dies as a crashed or OOM-killed container does: its trainer's processes first, so that
        their kernel closes their connections, then the rest of the pod. (Killed all at once, the pod's
        network namespace can vanish before its sockets close; its peers then see a silent peer, which
        is the cut-link test's case.)"""
        podman("kill", "--signal", "KILL", f"{self.name}-{index}-trainer")
        podman("pod", "kill", "--signal", "KILL", f"{self.name}-{index}", check=False)

    def cut_link(self, index: int) -> None:
        """The pod's interface down, inside its own network namespace: nothing it sends arrives, nothing closes."""
        infra = podman("pod", "inspect", f"{self.name}-{index}", "--format", "{{.InfraContainerID}}").stdout.strip()
        pid = podman("container", "inspect", infra, "--format", "{{.State.Pid}}").stdout.strip()
        subprocess.run(["nsenter", "-t", pid, "-n", "ip", "link", "set", "eth0", "down"], check=True)
