"""Rehearse a Kubernetes job on this machine: the rendered pods, played by podman.

`launch/submit.py --local` runs what `submit.py` would apply to a cluster, with podman standing
in for the parts of Kubernetes the job relies on:
- the Indexed Job: one pod per completion index, from the Job's own pod template, named and
  hostnamed `<job>-<i>`, with `JOB_COMPLETION_INDEX` in every container (the Job controller's part);
- the headless Service: a private network named after the job, on which `<job>-<i>.<job>`
  resolves (podman's DNS) from the moment that pod exists, as with `publishNotReadyAddresses`;
- the ConfigMap, played with every pod; the W&B Secret as a podman secret; each claim as a podman
  volume, optionally bound to a host directory (`--local-volume CLAIM=DIR`);
- the pod as written: init container first, uid 10001, read-only root filesystem, dropped
  capabilities, memory limit.
Not rehearsed: scheduling, and the Job's retries (resubmit after a failure: a job of the same
name resumes from its checkpoints). GPUs reach played pods only with podman 5.4 or newer, which
reads CDI device names from a container's resources (see `gpu_resources`).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.kube.command import expand_env_refs
from pipeline.kube.pod import Obj, config_map_name
from pipeline.kube.render import render, to_yaml
from pipeline.kube.spec import INSTANCE_LABEL, TRAINER_CONTAINER, JobSpec, pod_hostname

INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # as the Job controller labels its pods
RANK_VAR = "JOB_COMPLETION_INDEX"
RUN_AS_USER = 10001
_CAP_SYS_RESOURCE = 24
# podman 5.4 is the first to read CDI device names (nvidia.com/gpu=0) from a played pod's resources.
_CDI_PODMAN = (5, 4)


# -- podman itself ---------------------------------------------------------------------------

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


def _exists(kind: str, name: str) -> bool:
    return podman(kind, "exists", name, check=False).returncode == 0


# -- the pods a Job controller would create --------------------------------------------------

def gpu_resources(resources: Obj, index: int, gpus: int) -> Obj:
    """`nvidia.com/gpu: G` -> G CDI devices of their own per pod: pod i gets GPUs i*G .. i*G+G-1.

    podman 5.4+ takes a CDI name as a resource key (`nvidia.com/gpu=3: 1`); the host needs the
    NVIDIA Container Toolkit's CDI spec (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`).
    """
    out = copy.deepcopy(resources)
    for section in ("requests", "limits"):
        values = out.get(section, {})
        if values.pop("nvidia.com/gpu", None) is not None:
            values.update({f"nvidia.com/gpu={index * gpus + j}": 1 for j in range(gpus)})
    return out


def scratch_root(name: str, memory: bool) -> Path:
    """Where a job's emptyDir volumes live on this host: memory-backed ones in /dev/shm."""
    base = Path("/dev/shm") if memory and Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / "lstm-pipeline-local" / name


def _own_empty_dirs(pod_spec: Obj, name: str, pod: str) -> list[Path]:
    """emptyDir volumes -> host directories of this pod alone, one per mount (subPath applied).

    podman 4.3 plays an emptyDir as a named volume that every pod of the same YAML shares, and
    mounts the volume's root whatever the subPath: pods would share /tmp and one pod's /tmp
    would be its /home. Returns the directories to create (group fsGroup, writable, as the
    kubelet makes them)."""
    empty = {v["name"]: v["emptyDir"] for v in pod_spec.get("volumes", []) if "emptyDir" in v}
    if not empty:
        return []
    made: dict[str, Path] = {}
    for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in empty:
                continue
            sub = mount.pop("subPath", "")
            key = f"{mount['name']}-{sub}" if sub else mount["name"]
            memory = empty[mount["name"]].get("medium") == "Memory"
            made[key] = scratch_root(name, memory) / pod / mount["name"] / sub
            mount["name"] = key
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if v["name"] not in empty] + [
        {"name": key, "hostPath": {"path": str(path), "type": "Directory"}} for key, path in made.items()]
    return list(made.values())


def pod_documents(spec: JobSpec, index: int) -> tuple[list[Obj], list[Path]]:
    """The ConfigMap and the pod of completion index `index`, from the rendered Job; and the host
    directories that stand in for its emptyDir volumes (to be created before it is played)."""
    config_map, _service, job = render(spec, "job")
    template = copy.deepcopy(job["spec"]["template"])
    name = pod_hostname(spec.name, "job", index)
    pod_spec = template["spec"]
    pod_spec["hostname"] = name
    for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        container["env"] = [*container.get("env", []), {"name": RANK_VAR, "value": str(index)}]
        # The kubelet expands $(VAR) in command lines from the container's env; podman does not.
        values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        container["command"] = expand_env_refs(container["command"], values)
        # A containerPort is documentation to Kubernetes; podman 4.3 publishes it on the host,
        # where the second pod's port collides with the first's. Pods reach each other directly.
        container.pop("ports", None)
        if spec.gpus_per_node:
            container["resources"] = gpu_resources(container["resources"], index, spec.gpus_per_node)
    scratch = _own_empty_dirs(pod_spec, spec.name, name)
    labels = {**template["metadata"]["labels"], INDEX_LABEL: str(index), "job-name": spec.name}
    # Init containers of the default kind are removed once they ran, and their logs with them.
    annotations = {"io.podman.annotations.init.container.type": "always"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels, "annotations": annotations},
           "spec": pod_spec}
    return [config_map, pod], scratch


def make_scratch(directories: list[Path], group: int) -> None:
    for path in directories:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 0, group)
        path.chmod(0o2775)  # group-writable and inherited: what fsGroup gives an emptyDir


# -- what a cluster holds for the job: claims, secret, network -------------------------------

def _volume_device(name: str) -> str | None:
    raw = podman("volume", "inspect", name, "--format", "{{json .Options}}").stdout.strip()
    options = json.loads(raw) if raw and raw != "null" else {}
    return options.get("device")


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
        if _exists("volume", claim):
            device = _volume_device(claim)
            if device != str(directory):
                raise UserError(f"podman volume {claim} already exists and holds {device or 'its own data'}, not "
                                f"{directory}: remove it (podman volume rm {claim}) or name another claim")
        else:
            podman("volume", "create", "--label", "lstm-pipeline.claim=1", "--opt", "type=none", "--opt", "o=bind",
                   "--opt", f"device={directory}", claim)
    elif not _exists("volume", claim):
        if not writable:
            raise UserError(f"the data claim {claim} is not a podman volume on this machine: pass --local-volume "
                            f"{claim}=DIR with DIR a prepared dataset (for example data/fashion_mnist)")
        podman("volume", "create", "--label", "lstm-pipeline.claim=1", claim)
        fresh = Path(podman("volume", "inspect", claim, "--format", "{{.Mountpoint}}").stdout.strip())
        os.chown(fresh, RUN_AS_USER, RUN_AS_USER)  # a fresh volume belongs to root; the pods run as 10001
    where = Path(_volume_device(claim) or podman("volume", "inspect", claim, "--format", "{{.Mountpoint}}").stdout.strip())
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
    if _exists("secret", name):
        return f"podman secret {name} (exists)"
    value = os.environ.get("WANDB_API_KEY")
    if not value:
        raise UserError(f"--wandb-secret {name}: there is no podman secret {name} on this machine and WANDB_API_KEY is "
                        "not set; export WANDB_API_KEY to have it created, or drop --wandb-secret (runs log offline)")
    import base64

    payload = json.dumps({key: base64.b64encode(value.encode()).decode()})
    podman("secret", "create", "--label", "lstm-pipeline.secret=1", name, "-", stdin=payload)
    return f"podman secret {name} (created from WANDB_API_KEY)"


def ensure_network(name: str) -> None:
    if not _exists("network", name):
        podman("network", "create", "--label", f"{INSTANCE_LABEL}={name}", name)


# -- submit, status, logs, delete ------------------------------------------------------------

def _pods(name: str) -> list[str]:
    out = podman("pod", "ps", "--filter", f"label={INSTANCE_LABEL}={name}", "--format", "{{.Name}}").stdout
    return sorted(out.split(), key=lambda pod: int(pod.rsplit("-", 1)[1]) if pod.rsplit("-", 1)[1].isdigit() else 0)


def config_volume(name: str) -> str:
    """podman keeps a played ConfigMap as a volume of the ConfigMap's name, and reuses it when it exists."""
    return config_map_name(name)


def check_local(spec: JobSpec, fmt: str) -> None:
    if fmt != "job":
        raise UserError(f"--local plays the plain Indexed Job; --format {fmt} needs its operator on a cluster")
    podman_path()
    if not _exists("image", spec.image):
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
    if _exists("volume", config_volume(spec.name)):  # left by an earlier job of this name: it may hold another config
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
    """Like a foreground delete: the pods are stopped (SIGTERM, 30 s grace, as the pod spec asks) and gone
    when this returns; the claims and the secret stay, as they would on a cluster."""
    pods = _pods(name)
    if pods:
        podman("pod", "stop", "--time", "30", *pods, check=False)
        podman("pod", "rm", "--force", *pods)
    if _exists("network", name):
        podman("network", "rm", "--force", name, check=False)
    if _exists("volume", config_volume(name)):
        podman("volume", "rm", "--force", config_volume(name), check=False)
    for memory in (False, True):
        shutil.rmtree(scratch_root(name, memory), ignore_errors=True)
    print(f"deleted job {name} ({len(pods)} pod(s)); claims and secrets are kept", file=sys.stderr)
