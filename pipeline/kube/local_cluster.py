"""Stand in on this host for what a cluster holds for a job besides its pods.

Each claim is a podman volume (optionally bound to a host directory), the W&B Secret a podman
secret, the headless Service a podman network named after the job, the played ConfigMap a podman
volume, and each emptyDir a host directory of its pod's own.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.kube.pod import config_map_name
from pipeline.kube.podman import exists, podman, volume_device, volume_mountpoint
from pipeline.kube.spec import INSTANCE_LABEL

RUN_AS_USER = 10001  # the uid the pods run as (pod.py); claims they write to must be theirs


def ensure_claim(claim: str, host_dir: str | None, writable: bool) -> Path:
    """The podman volume standing in for a claim; its directory on this host."""
    if host_dir is not None:
        directory = Path(host_dir).resolve()
        if writable:
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if created:
                os.chown(directory, RUN_AS_USER, RUN_AS_USER)
        if not directory.is_dir():
            raise UserError(f"--local-volume {claim}={host_dir}: {directory} is not a directory")
        if exists("volume", claim):
            device = volume_device(claim)
            if device != str(directory):
                raise UserError(f"podman volume {claim} already exists and holds {device or 'its own data'}, not "
                                f"{directory}: remove it (podman volume rm {claim}) or name another claim")
        else:
            podman("volume", "create", "--label", "lstm-pipeline.claim=1", "--opt", "type=none", "--opt", "o=bind",
                   "--opt", f"device={directory}", claim)
    elif not exists("volume", claim):
        if not writable:
            raise UserError(f"the data claim {claim} is not a podman volume on this machine: pass --local-volume "
                            f"{claim}=DIR with DIR a prepared dataset (for example data/fashion_mnist)")
        podman("volume", "create", "--label", "lstm-pipeline.claim=1", claim)
        fresh = Path(volume_mountpoint(claim))
        os.chown(fresh, RUN_AS_USER, RUN_AS_USER)  # a fresh volume belongs to root; the pods run as 10001
    where = Path(volume_device(claim) or volume_mountpoint(claim))
    if writable and not _writable_by(where, RUN_AS_USER):
        raise UserError(f"the output claim {claim} ({where}) is not writable by uid {RUN_AS_USER}, which the pods "
                        f"run as: chown {RUN_AS_USER}:{RUN_AS_USER} {where}")
    return where


def _writable_by(path: Path, uid: int) -> bool:
    st = path.stat()
    return st.st_uid == uid or bool(st.st_mode & 0o002)


def ensure_secret(name: str, key: str) -> str:
    """A podman secret `name` holding `key`; made from $WANDB_API_KEY when it does not exist yet.

    podman 4.3 reads a secret for `secretKeyRef` as a JSON object of base64 values (later
    versions also take a Secret's YAML); that form is what is written here.
    """
    if exists("secret", name):
        return f"podman secret {name} (exists)"
    value = os.environ.get("WANDB_API_KEY")
    if not value:
        raise UserError(f"--wandb-secret {name}: there is no podman secret {name} on this machine and WANDB_API_KEY is "
                        "not set; export WANDB_API_KEY to have it created, or drop --wandb-secret (runs log offline)")
    payload = json.dumps({key: base64.b64encode(value.encode()).decode()})
    podman("secret", "create", "--label", "lstm-pipeline.secret=1", name, "-", stdin=payload)
    return f"podman secret {name} (created from WANDB_API_KEY)"


def ensure_network(name: str) -> None:
    if not exists("network", name):
        podman("network", "create", "--label", f"{INSTANCE_LABEL}={name}", name)


def config_volume(name: str) -> str:
    """podman keeps a played ConfigMap as a volume of the ConfigMap's name, and reuses it when it exists."""
    return config_map_name(name)


def make_scratch(directories: list[Path], group: int) -> None:
    for path in directories:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 0, group)
        path.chmod(0o2775)  # group-writable and inherited: what fsGroup gives an emptyDir
