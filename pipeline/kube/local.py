"""Rehearse a Kubernetes job on this machine: submit, status, logs and delete, with podman for a cluster.

`launch/submit.py --local` runs what `submit.py` would apply to a cluster, with podman standing
in for the parts of Kubernetes the job relies on:
- the Indexed Job: one pod per completion index, from the Job's own pod template, named and
  hostnamed `<job>-<i>`, with `JOB_COMPLETION_INDEX` in every container (the Job controller's part,
  local_pods.py);
- the headless Service: a private network named after the job, on which `<job>-<i>.<job>`
  resolves (podman's DNS) from the moment that pod exists, as with `publishNotReadyAddresses`;
- the ConfigMap, played with every pod; the W&B Secret as a podman secret; each claim as a podman
  volume, optionally bound to a host directory (`--local-volume CLAIM=DIR`) (local_cluster.py);
- the pod as written: init container first, uid 10001, read-only root filesystem, dropped
  capabilities, memory limit.
Not rehearsed: scheduling, and the Job's retries (resubmit after a failure: a job of the same
name resumes from its checkpoints). GPUs reach played pods only with podman 5.4 or newer, which
reads CDI device names from a container's resources (see `local_pods.gpu_resources`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.kube.local_cluster import (
    RUN_AS_USER,
    config_volume,
    ensure_claim,
    ensure_network,
    ensure_secret,
    make_scratch,
)
from pipeline.kube.local_pods import pod_documents, scratch_root
from pipeline.kube.pod import TUNE_GRACE_S
from pipeline.kube.podman import exists, podman, podman_env, podman_path, podman_version
from pipeline.kube.render import to_yaml
from pipeline.kube.spec import INSTANCE_LABEL, TRAINER_CONTAINER, JobSpec, pod_hostname

# podman 5.4 is the first to read CDI device names (nvidia.com/gpu=0) from a played pod's resources.
_CDI_PODMAN = (5, 4)


def _pods(name: str) -> list[str]:
    out = podman("pod", "ps", "--filter", f"label={INSTANCE_LABEL}={name}", "--format", "{{.Name}}").stdout
    return sorted(out.split(), key=lambda pod: int(pod.rsplit("-", 1)[1]) if pod.rsplit("-", 1)[1].isdigit() else 0)


def check_local(spec: JobSpec, fmt: str) -> None:
    if fmt != "job":
        raise UserError(f"--local plays the plain Indexed Job; --format {fmt} needs its operator on a cluster")
    podman_path()
    if not exists("image", spec.image):
        raise UserError(f"image {spec.image} is not on this machine: build it with `make image` (it prints the name) "
                        "and pass that as --image")
    if spec.gpus_per_node and podman_version() < _CDI_PODMAN:
        version = ".".join(map(str, podman_version()))
        raise UserError(f"podman {version} cannot give GPUs to played pods (CDI devices in kube play came with podman "
                        "5.4): rehearse with --gpus-per-node 0, or use podman 5.4+ with the NVIDIA Container Toolkit's "
                        "CDI spec")
    if _pods(spec.name):
        raise UserError(f"job {spec.name} already exists on this machine: delete it first "
                        f"(python launch/submit.py delete {spec.name} --local); a resubmission resumes from its checkpoints")
    if exists("volume", config_volume(spec.name)):  # left by an earlier job of this name: it may hold another config
        podman("volume", "rm", "--force", config_volume(spec.name))


def play_pod(spec: JobSpec, index: int) -> subprocess.Popen:
    """Start pod `index`: podman returns once its init container has finished (or failed)."""
    docs, scratch = pod_documents(spec, index)
    make_scratch(scratch, docs[1]["spec"]["securityContext"].get("fsGroup", RUN_AS_USER))
    text = to_yaml(docs)
    alias = f"{pod_hostname(spec.name, 'job', index)}.{spec.name}"
    proc = subprocess.Popen([podman_path(), "kube", "play", "--network", f"{spec.name}:alias={alias}", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=podman_env())
    assert proc.stdin is not None
    proc.stdin.write(text)
    proc.stdin.close()
    return proc


def prepare(spec: JobSpec, volumes: dict[str, str]) -> list[str]:
    """Claims, secret and network for the job; what was set up, for the user."""
    unknown = set(volumes) - {spec.data_pvc, spec.output_pvc}
    if unknown:
        raise UserError(f"--local-volume {', '.join(sorted(unknown))}: not a claim of this job "
                        f"(--data-pvc {spec.data_pvc}, --output-pvc {spec.output_pvc})")
    notes = []
    if spec.data_pvc:
        notes.append(f"data claim {spec.data_pvc}: {ensure_claim(spec.data_pvc, volumes.get(spec.data_pvc), False)}")
    if spec.output_pvc:
        notes.append(f"output claim {spec.output_pvc}: "
                     f"{ensure_claim(spec.output_pvc, volumes.get(spec.output_pvc), True)}")
    if spec.wandb_secret:
        notes.append(ensure_secret(spec.wandb_secret, spec.wandb_secret_key))
    ensure_network(spec.name)
    return notes


def submit_local(spec: JobSpec, fmt: str, volumes: dict[str, str], indexes: list[int] | None = None) -> None:
    check_local(spec, fmt)
    for note in prepare(spec, volumes):
        print(f"local: {note}", file=sys.stderr)
    # One at a time, in index order: podman 4.3 fails pods whose networks are set up concurrently
    # ("internal libpod error"), and a play returns only once the pod's init container is done,
    # which on ranks > 0 waits for the master's port.
    for index in range(spec.nodes) if indexes is None else indexes:
        wait_played(spec, index, play_pod(spec, index))
    print(f"submitted job {spec.name} locally: {spec.nodes} pod(s) on podman network {spec.name}\n"
          f"  python launch/submit.py status {spec.name} --local\n"
          f"  python launch/submit.py logs {spec.name} --local --follow\n"
          f"  python launch/submit.py delete {spec.name} --local", file=sys.stderr)


def wait_played(spec: JobSpec, index: int, proc: subprocess.Popen) -> None:
    assert proc.stderr is not None
    err = proc.stderr.read()
    if proc.wait() != 0:
        last = err.strip().splitlines()[-1] if err.strip() else "no message"
        raise UserError(f"pod {pod_hostname(spec.name, 'job', index)} did not start ({last}); its init container's "
                        f"words: python launch/submit.py logs {spec.name} --rank {index} --local --init")


@dataclass(frozen=True)
class PodState:
    name: str
    rank: int
    state: str  # created, running, exited
    exit_code: int | None
    address: str


def pod_states(name: str) -> list[PodState]:
    states = []
    for pod in _pods(name):
        raw = podman("container", "inspect", f"{pod}-{TRAINER_CONTAINER}", check=False).stdout
        info = (json.loads(raw) or [{}])[0] if raw.strip() else {}
        state = info.get("State", {})
        networks = info.get("NetworkSettings", {}).get("Networks", {}) or {}
        address = next((n.get("IPAddress", "") for n in networks.values()), "")
        status = state.get("Status", "missing")
        code = state.get("ExitCode") if status == "exited" else None
        if not address:  # the trainer shares the pod's network namespace: the infra container holds the address
            address = _pod_address(pod)
        states.append(PodState(pod, int(pod.rsplit("-", 1)[1]), status, code, address))
    return states


def _pod_address(pod: str) -> str:
    infra = podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}", check=False).stdout.strip()
    if not infra:
        return ""
    raw = podman("container", "inspect", infra, "--format", "{{json .NetworkSettings.Networks}}", check=False).stdout
    try:
        networks = json.loads(raw) or {}
    except json.JSONDecodeError:
        return ""
    return next((n.get("IPAddress", "") for n in networks.values()), "")


def status_local(name: str) -> None:
    states = pod_states(name)
    if not states:
        raise UserError(f"no job {name} on this machine (python launch/submit.py ... --local starts one)")
    codes = [s.exit_code for s in states]
    if all(c == 0 for c in codes):
        overall = "succeeded"
    elif any(c not in (None, 0) for c in codes):
        overall = "failed"
    else:
        overall = "running"
    print(f"job {name}: {overall}")
    print(f"{'POD':<24} {'RANK':>4}  {'STATE':<8} {'EXIT':>4}  ADDRESS")
    for s in states:
        print(f"{s.name:<24} {s.rank:>4}  {s.state:<8} {'-' if s.exit_code is None else s.exit_code:>4}  {s.address}")


def _stream(container: str, follow: bool, prefix: str | None) -> None:
    args = [podman_path(), "logs", *(["--follow"] if follow else []), container]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=podman_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"[{prefix}] {line}" if prefix else line)
    proc.wait()


def logs_local(name: str, rank: int | None, follow: bool, init: bool = False) -> None:
    pods = _pods(name)
    if not pods:
        raise UserError(f"no job {name} on this machine")
    container = "preflight" if init else TRAINER_CONTAINER
    chosen = pods if rank is None else [p for p in pods if p.endswith(f"-{rank}")]
    if not chosen:
        raise UserError(f"job {name} has no pod of rank {rank} (it has {len(pods)})")
    if len(chosen) == 1:
        _stream(f"{chosen[0]}-{container}", follow, None)
        return
    threads = [threading.Thread(target=_stream, args=(f"{p}-{container}", follow, f"pod/{p}/{container}"))
               for p in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def delete_local(name: str) -> None:
    """Like a foreground delete: the pods are stopped (SIGTERM, then SIGKILL after the longest grace a pod
    spec asks for: podman waits only until they exit) and gone when this returns; the claims and the secret
    stay, as they would on a cluster."""
    pods = _pods(name)
    if pods:
        podman("pod", "stop", "--time", str(TUNE_GRACE_S), *pods, check=False)
        podman("pod", "rm", "--force", *pods)
    if exists("network", name):
        podman("network", "rm", "--force", name, check=False)
    if exists("volume", config_volume(name)):
        podman("volume", "rm", "--force", config_volume(name), check=False)
    for memory in (False, True):
        shutil.rmtree(scratch_root(name, memory), ignore_errors=True)
    print(f"deleted job {name} ({len(pods)} pod(s)); claims and secrets are kept", file=sys.stderr)
