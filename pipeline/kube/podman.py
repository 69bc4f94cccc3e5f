"""Run podman from this process: find it, give it an environment it can start containers with, run it.

Every podman command of the local rehearsal goes through here, so each one gets the same
environment (see `podman_env`) and the same error on failure: a UserError naming the command.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.errors import UserError

_CAP_SYS_RESOURCE = 24  # its bit in /proc/self/status CapEff: without it, rlimits cannot be raised


def _can_raise_rlimits() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    return True


def _limits_conf() -> Path:
    """A containers.conf giving containers this process's own limits.

    podman asks the runtime for nofile 1048576 in every container; where root lacks
    CAP_SYS_RESOURCE (a container or sandbox of its own) that is refused and no container
    starts ("error setting rlimit ... operation not permitted"). nproc above the kernel's pid_max
    is refused the same way.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 32768

    def cap(value: int) -> int:
        return pid_max if value == resource.RLIM_INFINITY else min(value, pid_max)

    text = ("# Written by the pipeline's local rehearsal: containers get the limits of the shell that started them.\n"
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile[0]}:{nofile[1]}", "nproc={cap(nproc[0])}:{cap(nproc[1])}"]\n')
    path = Path(tempfile.gettempdir()) / f"lstm-pipeline-containers-{os.getuid()}.conf"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and not _can_raise_rlimits():
        env["CONTAINERS_CONF"] = str(_limits_conf())
    return env


def podman_path() -> str:
    path = shutil.which("podman")
    if path is None:
        raise UserError("--local plays the job with podman, which is not on PATH: install it (Debian: apt-get install "
                        "podman), or submit to a cluster without --local")
    return path


def podman(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([podman_path(), *args], input=stdin, capture_output=True, text=True, env=podman_env())
    if check and proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"'podman {' '.join(args[:3])} ...' failed with exit status {proc.returncode}: "
                        f"{message[-1] if message else 'no message'}")
    return proc


def podman_version() -> tuple[int, int]:
    raw = podman("version", "--format", "{{.Client.Version}}").stdout.strip()
    try:
        major, minor = raw.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def exists(kind: str, name: str) -> bool:
    """Whether podman has a `kind` (image, volume, secret, network) called `name`."""
    return podman(kind, "exists", name, check=False).returncode == 0


def volume_device(name: str) -> str | None:
    """The host directory a bind-mounted volume stands for; None for a volume of podman's own."""
    raw = podman("volume", "inspect", name, "--format", "{{json .Options}}").stdout.strip()
    options = json.loads(raw) if raw and raw != "null" else {}
    return options.get("device")


def volume_mountpoint(name: str) -> str:
    return podman("volume", "inspect", name, "--format", "{{.Mountpoint}}").stdout.strip()
