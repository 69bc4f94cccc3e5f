"""The pod template shared by every rendering: containers, env, volumes, resources, security."""

from __future__ import annotations

from typing import Any

from pipeline.distributed.elastic import FRESH_STORE_VAR
from pipeline.distributed.launch_env import JOB_ID_VAR
from pipeline.kube.command import (
    MASTER_ADDR_VAR,
    MASTER_PORT_VAR,
    pod_command,
    pod_paths,
    preflight_command,
)
from pipeline.kube.spec import (
    CONFIG_MOUNT,
    DATA_MOUNT,
    HOME_DIR,
    OUTPUT_MOUNT,
    PREFLIGHT_CONTAINER,
    TRAINER_CONTAINER,
    WORKDIR,
    Format,
    JobSpec,
    master_address,
)
from pipeline.tuning import STORAGE_VAR

Obj = dict[str, Any]

# Sizing per training process; memory and CPU can be overridden with --memory / --cpu.
_MEMORY_PER_PROCESS_MI = 4096
_SHM_PER_LOADER_WORKER_MI = 256  # a few prefetched batches per worker pass through /dev/shm
_SHM_MIN_MI = 1024
TUNE_GRACE_S = 90  # a tuner pod's grace: the longest any of these pods asks for
_RUN_AS_USER = 10001  # the Dockerfile's non-root user (above the range distributions give out)


def config_map_name(job: str) -> str:
    return f"{job}-config"


def _mi(value: int) -> str:
    return f"{value // 1024}Gi" if value % 1024 == 0 else f"{value}Mi"


def shm_size_mi(spec: JobSpec) -> int:
    return max(_SHM_MIN_MI, spec.procs_per_node * spec.loader_workers * _SHM_PER_LOADER_WORKER_MI)


def resources(spec: JobSpec) -> Obj:
    procs = spec.procs_per_node
    cpu = spec.cpu or str(procs * (1 + spec.loader_workers))
    # The memory-backed /dev/shm counts against the container's memory limit, so add it.
    memory = spec.memory or _mi(procs * _MEMORY_PER_PROCESS_MI + shm_size_mi(spec))
    requests: Obj = {"cpu": cpu, "memory": memory}
    # Limits = requests: a training pod should not be the first evicted under pressure, and the CPU
    # limit is the quota each rank sizes its threads from (pipeline/distributed/cpu_threads.py), so a
    # rank never starts more threads than the pod may run: the node's cores are not the pod's.
    limits: Obj = {"cpu": cpu, "memory": memory}
    if spec.gpus_per_node:
        requests["nvidia.com/gpu"] = spec.gpus_per_node
        limits["nvidia.com/gpu"] = spec.gpus_per_node
    return {"requests": requests, "limits": limits}


def trainer_env(spec: JobSpec, fmt: Format) -> list[Obj]:
    paths = pod_paths(spec)
    env: list[Obj] = [
        {"name": MASTER_ADDR_VAR, "value": master_address(spec, fmt)},
        {"name": MASTER_PORT_VAR, "value": str(spec.port)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # One W&B group per job: rank 0 logs the run, a resubmission joins the same group.
        {"name": "WANDB_PROJECT", "value": spec.wandb_project},
        {"name": "WANDB_RUN_GROUP", "value": spec.name},
        # The image's working directory is read-only for the non-root user.
        {"name": "WANDB_DIR", "value": paths.output_dir},
        # A replacement pod of this job continues in output_dir without waiting for the dead
        # pod's lease to expire (pipeline/distributed/lease.py).
        {"name": JOB_ID_VAR, "value": spec.name},
    ]
    if spec.rendezvous == "c10d":
        # Read by the elastic agent: a fresh rendezvous store per round, so restarted workers on
        # several nodes never read their predecessors' keys (see pipeline/distributed/elastic.py).
        env.append({"name": FRESH_STORE_VAR, "value": "1"})
    if spec.wandb_entity:
        env.append({"name": "WANDB_ENTITY", "value": spec.wandb_entity})
    secrets = [("WANDB_API_KEY", spec.wandb_secret, spec.wandb_secret_key)]
    if spec.tune is not None:  # launch/tune.py's --storage defaults to Optuna's own variable
        secrets.append((STORAGE_VAR, spec.tune.storage_secret, spec.tune.storage_secret_key))
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
            for var, name, key in secrets if name]
    return env


def _security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        # Nothing in the image is written at run time; what needs writing (home dir caches of
        # wandb, matplotlib and torch; /tmp) lives on the scratch emptyDir below.
        "readOnlyRootFilesystem": True,
    }


def volumes(spec: JobSpec) -> list[Obj]:
    vols: list[Obj] = [
        {"name": "config", "configMap": {"name": config_map_name(spec.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _mi(shm_size_mi(spec))}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "2Gi"}},
    ]
    if spec.data_pvc:
        vols.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.data_pvc, "readOnly": True}})
    # Without a claim the outputs (and resumable checkpoints) die with the pod.
    outputs: Obj = {"persistentVolumeClaim": {"claimName": spec.output_pvc}} if spec.output_pvc else {"emptyDir": {}}
    vols.append({"name": "outputs", **outputs})
    return vols


def volume_mounts(spec: JobSpec, trainer: bool) -> list[Obj]:
    mounts: list[Obj] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
        {"name": "scratch", "mountPath": HOME_DIR, "subPath": "home"},
    ]
    if spec.data_pvc:
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
    if trainer:
        mounts += [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "outputs", "mountPath": OUTPUT_MOUNT}]
    return mounts


def _container(spec: JobSpec, name: str, command: list[str], env: list[Obj], resources_: Obj, trainer: bool) -> Obj:
    """What the init and trainer containers share: image, workdir, mounts, hardening."""
    ports = [{"name": "rendezvous", "containerPort": spec.port, "protocol": "TCP"}] if trainer else None
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        "command": command,
        "env": env,
        **({"ports": ports} if ports else {}),
        "resources": resources_,
        "volumeMounts": volume_mounts(spec, trainer=trainer),
        "securityContext": _security_context(),
    }


def preflight_container(spec: JobSpec, fmt: Format) -> Obj:
    env = [e for e in trainer_env(spec, fmt) if e["name"] in (MASTER_ADDR_VAR, MASTER_PORT_VAR)]
    small = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    return _container(spec, PREFLIGHT_CONTAINER, preflight_command(spec, pod_paths(spec)), env, small, trainer=False)


def trainer_container(spec: JobSpec, fmt: Format) -> Obj:
    return _container(spec, TRAINER_CONTAINER, pod_command(spec, pod_paths(spec)), trainer_env(spec, fmt), resources(spec), trainer=True)


def pod_security_context() -> Obj:
    # fsGroup makes the output claim writable by the non-root user on most storage drivers.
    return {"runAsUser": _RUN_AS_USER, "runAsGroup": _RUN_AS_USER, "fsGroup": _RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def tolerations(spec: JobSpec) -> list[Obj]:
    # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule.
    if not spec.gpus_per_node:
        return []
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def grace_s(spec: JobSpec) -> int:
    """SIGTERM to SIGKILL: a trainer checkpoints within a second or two; a tuner stops its trial's run (up to
    60 s for its checkpoint) and records the trial as interrupted."""
    return TUNE_GRACE_S if spec.tune is not None else 30


def pod_spec(spec: JobSpec, fmt: Format) -> Obj:
    """The pod spec of one node of the job (the Job/JobSet template adds restart and DNS fields)."""
    out: Obj = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job replaces failed pods
        "securityContext": pod_security_context(),
        "initContainers": [preflight_container(spec, fmt)],
        "containers": [trainer_container(spec, fmt)],
        "volumes": volumes(spec),
        "terminationGracePeriodSeconds": grace_s(spec),
        # Service links would inject <SVC>_PORT variables, e.g. MASTER_PORT for a Service named "master".
        "enableServiceLinks": False,
    }
    tol = tolerations(spec)
    if tol:
        out["tolerations"] = tol
    return out
