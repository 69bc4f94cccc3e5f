"""How many OpenMP threads a process computes with, and how they wait: decided before torch loads.

torch sizes its thread pool from the node's cores: not from the affinity mask, not from the
container's CPU quota, not from the other ranks on the node. A pod limited to 1 CPU on a 64-core
node starts 64 threads that the quota then stops and starts. And GNU libgomp (the OpenMP runtime
of torch's x86 wheels) spins about 3 ms at every barrier before it sleeps: a thread waiting there
for a thread whose core another process holds burns the slice the other needs. On 2 cores beside
two busy processes at the same priority, a 2-thread step ran up to 270x slower (docs/performance.md).

So, once per process and before anything imports torch (libgomp reads its environment when it
loads): the threads are the CPUs this process may use (affinity mask, cgroup v1/v2 CPU quota)
divided among the processes of its node, unless the user said (the config's `train.cpu_threads`,
else OMP_NUM_THREADS, which accelerate's --num_cpu_threads_per_process and torchrun set); and
threads spin only briefly before they sleep (GOMP_SPINCOUNT, unless OMP_WAIT_POLICY or
GOMP_SPINCOUNT is set). Pure logic, no torch import: this module runs first.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.distributed.launch_env import LaunchEnv

THREADS_VAR = "OMP_NUM_THREADS"
# OMP_NUM_THREADS=0 means nothing to OpenMP; here it asks for the computed count. The Makefile and the
# rendered pods pass it as accelerate's --num_cpu_threads_per_process 0, which would otherwise export
# its default of 1 thread per process to every rank.
AUTO_THREADS = "0"
WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
SPINCOUNT_VAR = "GOMP_SPINCOUNT"
# libgomp's default is 300,000 spins (about 3 ms) before a waiting thread sleeps; PASSIVE is 0. Where
# the CPUs are ours, a short spin keeps the idle speed (a sleeping thread costs a futex wake at every
# parallel region); where they are shared at start, threads that sleep at once keep a fair share
# (they wake ahead of busy processes instead of burning the slice the thread they wait for needs).
# docs/performance.md, "Threads on a shared CPU", has the measurements behind both.
SPINCOUNT = "3000"
PROBE_S = 0.2  # how long measure_free spins at start
SHARED_BELOW = 0.85  # CPUs got by the probe, as a share of the threads, under which the CPUs count as shared


@dataclass(frozen=True)
class CgroupQuota:
    cpus: float  # CPUs' worth of time per period
    where: str  # the file that set it


@dataclass(frozen=True)
class CpuThreads:
    threads: int
    waiting_env: dict[str, str]  # OpenMP waiting variables to export (none where the environment set them)
    source: str  # where the count came from, for the log line
    waiting: str  # how idle threads wait, and who chose it

    def describe(self) -> str:
        return f"{self.threads} CPU thread(s) per process: {self.source}; {self.waiting}"


def _mounts(root: Path) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root in the hierarchy, mount point, super options) of every cgroup file system mounted."""
    out = []
    try:
        lines = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype = fields[dash + 1]
        if fstype in ("cgroup", "cgroup2") and len(fields) > dash + 3:
            out.append((fstype, fields[3], fields[4], set(fields[dash + 3].split(","))))
    return out


def _own_cgroups(root: Path) -> dict[str, str]:
    """This process's cgroup path per hierarchy: 'cpu' for v1's CPU controller, '' for v2."""
    paths: dict[str, str] = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = parts[1].split(",")
        if parts[0] == "0" and parts[1] == "":
            paths[""] = parts[2]
        elif "cpu" in controllers:
            paths["cpu"] = parts[2]
    return paths


def _dirs(root: Path, mount_root: str, mount_point: str, cgroup: str) -> list[Path]:
    """The cgroup's directory under its mount, then each parent up to the mount: a limit set on any of
    them (a pod's, above its container's) binds the process."""
    base = root / mount_point.lstrip("/")
    rel = cgroup
    if mount_root != "/" and (cgroup == mount_root or cgroup.startswith(mount_root.rstrip("/") + "/")):
        rel = cgroup[len(mount_root.rstrip("/")):]  # a container's mount shows its own cgroup as the root
    elif mount_root != "/":
        rel = "/"  # outside what the mount shows: the mount's own directory is all we can read
    parts = [p for p in rel.split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_quota(root: Path = Path("/")) -> CgroupQuota | None:
    """The tightest CPU quota over this process's cgroup and its parents (v2 cpu.max, v1 CFS), or None."""
    own = _own_cgroups(root)
    best: CgroupQuota | None = None
    for fstype, mount_root, mount_point, options in _mounts(root):
        key = "" if fstype == "cgroup2" else "cpu"
        if key not in own or (key == "cpu" and "cpu" not in options):
            continue
        read = _v2_quota if fstype == "cgroup2" else _v1_quota
        for directory in _dirs(root, mount_root, mount_point, own[key]):
            cpus = read(directory)
            if cpus is not None and (best is None or cpus < best.cpus):
                name = "cpu.max" if fstype == "cgroup2" else "cpu.cfs_quota_us"
                best = CgroupQuota(cpus, f"/{(directory / name).relative_to(root).as_posix()}")
    return best


def _user_threads(configured: int | None, environ: MutableMapping[str, str]) -> tuple[int, str] | None:
    if configured is not None:
        return configured, "train.cpu_threads in the config"
    raw = environ.get(THREADS_VAR, "").strip()
    if raw and raw != AUTO_THREADS:
        try:
            return max(1, int(raw.split(",")[0])), f"{THREADS_VAR}={raw} (yours, or the launcher's: accelerate " \
                                                    "--num_cpu_threads_per_process, torchrun)"
        except ValueError:
            pass  # not a number: OpenMP would ignore it too; count the CPUs instead
    return None


def measure_free(threads: int, seconds: float = PROBE_S) -> float:
    """CPUs' worth of time that `threads` busy threads get right now: `threads` where the CPUs are
    ours alone, less where other processes hold them (each runnable thread gets a fair share)."""
    block = bytes(1 << 16)  # sha256 of 64 KiB releases the GIL: the threads really run in parallel
    got = [0.0] * threads
    start = time.monotonic()
    stop = start + seconds

    def spin(i: int) -> None:
        begin = time.thread_time()
        while time.monotonic() < stop:
            hashlib.sha256(block).digest()
        got[i] = time.thread_time() - begin

    workers = [threading.Thread(target=spin, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(got) / max(time.monotonic() - start, 1e-9)


def _cpus(affinity: int, quota: CgroupQuota | None) -> int:
    return affinity if quota is None else max(1, min(affinity, math.floor(quota.cpus)))


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def usable_cpus(root: Path = Path("/")) -> int:
    """The CPUs this process may use: its affinity mask, bounded by its cgroup's CPU quota (a container's)."""
    return _cpus(_affinity(), cgroup_quota(root))


def _computed_threads(local_world_size: int, affinity: int, quota: CgroupQuota | None) -> tuple[int, str]:
    cpus = _cpus(affinity, quota)
    limit = f"cgroup quota {quota.cpus:g} CPUs ({quota.where})" if quota else "no cgroup CPU quota"
    return (max(1, cpus // max(1, local_world_size)),
            f"{cpus} usable CPU(s) (affinity mask {affinity}, {limit}) / {local_world_size} process(es) on this node")


def _waiting(environ: MutableMapping[str, str], threads: int, free: Callable[[int], float] | None) -> tuple[dict, str]:
    """The OpenMP variables to export for waiting, and what to say about it."""
    if WAIT_POLICY_VAR in environ or SPINCOUNT_VAR in environ:
        set_ = ", ".join(f"{k}={environ[k]}" for k in (WAIT_POLICY_VAR, SPINCOUNT_VAR) if k in environ)
        return {}, f"OpenMP waiting as set in the environment ({set_})"
    if threads > 1 and free is not None:  # one thread never waits for another: nothing to measure
        got = free(threads)
        if got < SHARED_BELOW * threads:
            return ({WAIT_POLICY_VAR: "PASSIVE"}, f"the CPUs are shared ({threads} busy threads got {got:.1f} CPUs "
                    f"at start): idle threads sleep at once ({WAIT_POLICY_VAR}=PASSIVE)")
    return {SPINCOUNT_VAR: SPINCOUNT}, f"idle threads spin briefly, then sleep ({SPINCOUNT_VAR}={SPINCOUNT})"


def decide(environ: MutableMapping[str, str], local_world_size: int, affinity: int, quota: CgroupQuota | None,
           configured: int | None = None, free: Callable[[int], float] | None = None) -> CpuThreads:
    """The thread count and waiting of one process. The count never depends on the load (it changes
    the float sums, and so a run's last digits); the waiting does (it changes nothing but the speed).
    `free(n)`: the CPUs n busy threads get now (measure_free; tests pass a fake), asked only where the
    waiting is left to decide and there is more than one thread."""
    user = _user_threads(configured, environ)
    threads, source = user if user is not None else _computed_threads(local_world_size, affinity, quota)
    exported, waiting = _waiting(environ, threads, free)
    return CpuThreads(threads, exported, source, waiting)


def to_stdout(line: str) -> None:
    print(line, flush=True)


def configure(env: LaunchEnv, configured: int | None = None, environ: MutableMapping[str, str] | None = None,
              root: Path = Path("/"), say: Callable[[str], None] | None = None,
              free: Callable[[int], float] | None = measure_free) -> CpuThreads:
    """Decide and export the OpenMP settings of this process (its loader workers inherit them), before
    torch loads; said once per node (local rank 0)."""
    environ = os.environ if environ is None else environ
    choice = decide(environ, env.local_world_size, _affinity(), cgroup_quota(root), configured, free)
    environ[THREADS_VAR] = str(choice.threads)
    environ.update(choice.waiting_env)
    torch = sys.modules.get("torch")
    if torch is not None:  # a caller imported it first (a benchmark in-process): resize its pool at least
        torch.set_num_threads(choice.threads)
    if env.local_rank == 0:  # a log line, like [train]'s; predict.py keeps it to itself (its stdout is data)
        (say or to_stdout)(f"[threads] {choice.describe()}")
    return choice
