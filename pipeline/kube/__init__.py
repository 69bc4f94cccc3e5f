"""Render and submit multi-node training jobs to Kubernetes.

spec.py (what is asked, validated) -> command.py (the pod's command lines) -> pod.py (the pod)
-> render.py (Job + Service, JobSet or TrainJob) -> kubectl.py / kustomize.py (where it goes).
preflight.py runs inside the pods as the init container.
local.py rehearses a Job on this machine (`submit.py --local`): local_pods.py turns the Job into
pods, local_cluster.py stands in for its claims, Secret and Service, podman.py runs podman.
"""

from pipeline.kube.build import build_spec
from pipeline.kube.command import (
    PodPaths,
    expand_env_refs,
    pod_command,
    pod_paths,
    preflight_command,
)
from pipeline.kube.render import render, to_yaml
from pipeline.kube.spec import FORMATS, Format, JobSpec, master_address

__all__ = [
    "FORMATS",
    "Format",
    "JobSpec",
    "PodPaths",
    "build_spec",
    "expand_env_refs",
    "master_address",
    "pod_command",
    "pod_paths",
    "preflight_command",
    "render",
    "to_yaml",
]
