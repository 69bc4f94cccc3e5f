"""Translate a rendered Indexed Job into the pods its Job controller would create, for `podman kube play`.

Pure: documents in, documents out, no podman and no writes. What the Job controller and the
kubelet add to the Job's pod template (the pod's name and hostname, `JOB_COMPLETION_INDEX`,
expanded `$(VAR)` references) is added here; what podman would play differently from a kubelet
(published ports, shared emptyDir volumes, GPUs as resource counts) is rewritten here.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from pipeline.kube.command import expand_env_refs
from pipeline.kube.pod import Obj
from pipeline.kube.render import render
from pipeline.kube.spec import JobSpec, pod_hostname

INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # as the Job controller labels its pods
RANK_VAR = "JOB_COMPLETION_INDEX"


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
    rendered = render(spec, "job")  # [config map, (headless service,) job]: a tuning job has no service
    config_map, job = rendered[0], rendered[-1]
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
