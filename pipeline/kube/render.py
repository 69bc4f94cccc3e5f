"""Render a JobSpec as Kubernetes objects: plain Indexed Job (default), JobSet, or Kubeflow TrainJob.

All three share the ConfigMap and the pod built in pod.py; they differ only in the controller
that creates the pods and in how those pods find each other.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.kube.command import CONFIG_KEY, MANIFEST_KEY, SPACE_KEY
from pipeline.kube.pod import (
    Obj,
    config_map_name,
    pod_spec,
)
from pipeline.kube.spec import (
    PREFLIGHT_CONTAINER,
    REPLICATED_JOB,
    TRAINER_CONTAINER,
    TRAINJOB_CONTAINER,
    Format,
    JobSpec,
    validate,
)

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"  # field names as of Kubeflow Trainer v2.3
PATCH_MANAGER = "lstm-pipeline.submit"
# Exit codes that mean "a bug, retrying cannot help": the preflight exits 2 for a bad config
# (ConfigError) and 1 for missing data (DataError). The trainer container (launch/node.py) exits
# with its worker's code: 2 is a bad config or command line, or a shard server that refuses for
# good (404, 401/403: pipeline/data/remote.py), 3 a diverged run (a retry would resume from the
# last good checkpoint and diverge again). Everything else is retried, 75 (a lost peer,
# pipeline/distributed/peers.py; a shard server down or overloaded past data.retry_s) among them.
PREFLIGHT_BUG_CODES = (1, 2)
TRAINER_BUG_CODES = (2, 3)


def _metadata(spec: JobSpec, name: str, queued: bool = False) -> Obj:
    meta: Obj = {"name": name}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    labels = dict(spec.labels)
    if queued and spec.queue:
        labels[QUEUE_LABEL] = spec.queue
    meta["labels"] = labels
    return meta


def config_map(spec: JobSpec) -> Obj:
    data = {CONFIG_KEY: spec.config_text}
    if spec.manifest_text is not None:
        data[MANIFEST_KEY] = spec.manifest_text
    if spec.tune is not None:
        data[SPACE_KEY] = spec.tune.space_text
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, config_map_name(spec.name)), "data": data}


def headless_service(spec: JobSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "clusterIP": "None",
            # Pods must resolve the master before it is Ready (it never is: no readiness probe).
            "publishNotReadyAddresses": True,
            "selector": dict(spec.labels),
            "ports": [{"name": "rendezvous", "port": spec.port, "targetPort": spec.port, "protocol": "TCP"}],
        },
    }


def _pod_failure_policy() -> Obj:
    return {"rules": [
        # Preemption, node drain, eviction: not the job's fault, does not count against the limit.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": PREFLIGHT_CONTAINER, "operator": "In",
                                              "values": list(PREFLIGHT_BUG_CODES)}},
        {"action": "FailJob", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In",
                                              "values": list(TRAINER_BUG_CODES)}},
    ]}


def _indexed_job_spec(spec: JobSpec, fmt: Format, backoff_limit: int) -> Obj:
    pod = pod_spec(spec, fmt)
    if fmt == "job":
        pod["subdomain"] = spec.name  # JobSet sets subdomain and hostnames itself
    return {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        "backoffLimit": backoff_limit,
        "podFailurePolicy": _pod_failure_policy(),
        # A replacement pod starts only once the old one is gone: never two pods of one rank.
        "podReplacementPolicy": "Failed",
        "template": {"metadata": {"labels": dict(spec.labels)}, "spec": pod},
    }


def _elastic(job_spec: Obj, spec: JobSpec) -> Obj:
    """An Indexed Job that can lose indexes (Kubernetes 1.31+). Survivors of a lost pod do not
    fail: their launchers re-form at the smaller size and resume. The lost index is retried
    `--restarts` times on its own; then it is given up, as long as no more than MAX - MIN are.
    Training is done when index 0, whose pod holds the rendezvous, succeeds: the Job then ends,
    whatever became of replacements still waiting for a node."""
    out = {k: v for k, v in job_spec.items() if k != "backoffLimit"}
    out["backoffLimitPerIndex"] = spec.restarts
    out["maxFailedIndexes"] = spec.nodes - spec.min_nodes
    out["successPolicy"] = {"rules": [{"succeededIndexes": "0"}]}
    return out


def indexed_job(spec: JobSpec) -> Obj:
    # One incident fails every pod (the survivors lose their peer), so the limit scales with nodes.
    job_spec = _indexed_job_spec(spec, "job", backoff_limit=spec.restarts * spec.nodes)
    if spec.elastic:
        job_spec = _elastic(job_spec, spec)
    if spec.queue:
        job_spec = {"suspend": True, **job_spec}  # Kueue unsuspends it on admission
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec, spec.name, queued=True),
            "spec": job_spec}


def jobset(spec: JobSpec) -> Obj:
    js_spec: Obj = {
        "network": {"enableDNSHostnames": True, "subdomain": spec.name, "publishNotReadyAddresses": True},
        "failurePolicy": {
            "maxRestarts": spec.restarts,
            "rules": [{"name": "fail-fast-on-bugs", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
        },
        "replicatedJobs": [{
            "name": REPLICATED_JOB,
            "replicas": 1,
            # backoffLimit 0: any failure fails the Job and the JobSet restarts every pod together.
            "template": {"metadata": {"labels": dict(spec.labels)},
                         "spec": _indexed_job_spec(spec, "jobset", backoff_limit=0)},
        }],
    }
    if spec.queue:
        js_spec = {"suspend": True, **js_spec}
    return {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": _metadata(spec, spec.name, queued=True),
            "spec": js_spec}


def trainjob(spec: JobSpec) -> Obj:
    """A TrainJob on the torch-distributed runtime; volumes and security come in as a runtime patch.

    Runtime patches can only amend the runtime's containers, not add one, so this rendering has
    no preflight init container: config errors surface in the trainer's log instead.
    """
    pod = pod_spec(spec, "trainjob")
    (container,) = pod["containers"]
    pod_patch: Obj = {
        "securityContext": pod["securityContext"],
        "volumes": pod["volumes"],
        "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": container["volumeMounts"],
                        "securityContext": container["securityContext"]}],
    }
    if "tolerations" in pod:
        pod_patch["tolerations"] = pod["tolerations"]
    tj_spec: Obj = {
        "runtimeRef": {"name": spec.runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
        "trainer": {
            "image": spec.image,
            "command": container["command"],
            "env": container["env"],
            "numNodes": spec.nodes,
            "numProcPerNode": spec.procs_per_node,
            "resourcesPerNode": container["resources"],
        },
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": REPLICATED_JOB,
                "template": {"spec": {"template": {"metadata": {"labels": dict(spec.labels)}, "spec": pod_patch}}},
            }]}}},
        }],
    }
    if spec.queue:
        tj_spec["suspend"] = True
    return {"apiVersion": TRAINJOB_API, "kind": "TrainJob", "metadata": _metadata(spec, spec.name, queued=True),
            "spec": tj_spec}


def render(spec: JobSpec, fmt: Format = "job") -> list[Obj]:
    """The objects to apply, in order (the ConfigMap first, so pods never wait for it)."""
    validate(spec, fmt)
    if spec.tune is not None:  # tuners find each other through the study's storage, not by DNS
        return [config_map(spec), indexed_job(spec)]
    if fmt == "job":
        return [config_map(spec), headless_service(spec), indexed_job(spec)]
    if fmt == "jobset":
        return [config_map(spec), jobset(spec)]
    return [config_map(spec), trainjob(spec)]


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> Any:
    # The shipped config stays readable (a block scalar) instead of one escaped line.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(docs: list[Obj]) -> str:
    return "---\n".join(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False) for doc in docs)
