"""What a submission asks for, checked before anything is rendered.

Every renderer and the kubectl helpers read a `JobSpec`; each rule lives here once and names
the flag the user has to change. `render` validates again because the format it is asked for
decides the pod hostnames, whose length is one of the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pipeline.errors import UserError
from pipeline.tuning import final_seeds

Format = Literal["job", "jobset", "trainjob"]
Rendezvous = Literal["static", "c10d"]
FORMATS: tuple[Format, ...] = ("job", "jobset", "trainjob")

# Paths inside the pod. Kept together so the pod simulation can swap them for local ones.
CONFIG_MOUNT = "/etc/pipeline"
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/outputs"
WORKDIR = "/app"  # where the Dockerfile copies launch/ (train.py is run by relative path)
HOME_DIR = "/home/app"  # the Dockerfile's HOME: on a scratch volume, the root filesystem is read-only

TRAINER_CONTAINER = "trainer"
INSTANCE_LABEL = "app.kubernetes.io/instance"  # selects every resource of one job (status, logs, delete)
PREFLIGHT_CONTAINER = "preflight"
# JobSet / TrainJob: the replicated job's name is part of every pod's hostname. Kubeflow's
# torch-distributed runtime fixes both the replicated job and its container to "node".
REPLICATED_JOB = "node"
TRAINJOB_CONTAINER = "node"

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_ENV_KEY = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


@dataclass(frozen=True)
class TuneSpec:
    """A tuning job (launch/tune.py in every pod): each pod a tuner of one study, with as many workers as GPUs."""

    space_text: str  # the search space file, byte for byte
    trials: int
    storage: str | None = None  # None: the study's journal file on the output claim, which every pod mounts
    final_seeds: str = "0,1,2"
    # A Secret holding the storage URL, read into OPTUNA_STORAGE: a password never sits in the Job's spec.
    storage_secret: str | None = None
    storage_secret_key: str = "url"
    processes: int = 1  # ranks of each trial's run (launch/tune.py --processes): a pod runs its GPUs / this trials at once
    refit: bool = True  # pod 0's final runs train on train + val where the trials cross-validated (--no-refit: False)


@dataclass(frozen=True)
class JobSpec:
    """One multi-node training job, independent of how it is rendered."""

    name: str
    image: str
    nodes: int  # the most pods; with min_nodes, an elastic job that goes on with as few as min_nodes
    gpus_per_node: int
    config_text: str  # the user's YAML file, byte for byte
    namespace: str | None = None
    data_pvc: str | None = None
    data_url: str | None = None
    manifest_text: str | None = None  # shipped with --data-url: the trainer reads the manifest from data.dir
    output_pvc: str | None = None
    wandb_secret: str | None = None
    wandb_secret_key: str = "api-key"
    wandb_project: str = "lstm-pipeline"
    wandb_entity: str | None = None
    queue: str | None = None
    rendezvous: Rendezvous = "static"
    max_restarts: int = 0
    port: int = 29500
    restarts: int = 1  # whole-job restarts after a failure (Job: backoffLimit = restarts * nodes)
    cpu: str | None = None  # per node; None: derived from processes and loader workers
    memory: str | None = None
    loader_workers: int = 0  # data.num_workers of the config: sizes /dev/shm and CPU requests
    mixed_precision: str = "no"  # train.mixed_precision of the config, repeated to the launcher
    wait_timeout_s: int = 900
    overrides: tuple[str, ...] = field(default_factory=tuple)  # user's key=value, passed through
    runtime: str = "torch-distributed"  # TrainJob: the ClusterTrainingRuntime to reference
    min_nodes: int | None = None  # --nodes MIN:MAX
    tune: TuneSpec | None = None  # --tune: the pods are tuners, not the ranks of one training run

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.nodes

    @property
    def world_sizes(self) -> list[int]:
        """Every number of processes the job can run with (a tuning job's: those of one trial's run)."""
        if self.tune is not None:
            return [self.tune.processes]
        low = self.min_nodes if self.elastic else self.nodes
        return [n * self.procs_per_node for n in range(low, self.nodes + 1)]

    @property
    def procs_per_node(self) -> int:
        # --gpus-per-node 0 is a CPU job: one process per pod (gloo).
        return max(self.gpus_per_node, 1)

    @property
    def total_processes(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def labels(self) -> dict[str, str]:
        # Selector for the Service and for status/logs/delete, on every resource of the job.
        return {"app.kubernetes.io/name": "lstm-pipeline", INSTANCE_LABEL: self.name}


def pod_hostname(name: str, fmt: Format, index: int) -> str:
    """The DNS label a pod of rank `index` gets (Indexed Job: <job>-<i>; JobSet: <js>-<rjob>-<j>-<i>)."""
    if fmt == "job":
        return f"{name}-{index}"
    return f"{name}-{REPLICATED_JOB}-0-{index}"


def master_address(spec: JobSpec, fmt: Format) -> str:
    # The service (and the JobSet's subdomain) is named after the job.
    return f"{pod_hostname(spec.name, fmt, 0)}.{spec.name}"


def slugify(text: str) -> str:
    """A DNS label from a file stem: configs/Fashion_MNIST.yaml -> fashion-mnist."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"lstm-{slug}".rstrip("-")
    return slug[:40].rstrip("-")


def _check_label(value: str, what: str, flag: str) -> None:
    if len(value) > 63:
        raise UserError(f"{what} '{value}' is {len(value)} characters; at most 63 are allowed ({flag})")
    if not _DNS_LABEL.match(value):
        raise UserError(
            f"{what} '{value}' is not a valid DNS label: use lowercase letters, digits and '-', "
            f"starting with a letter and ending with a letter or digit ({flag})"
        )


def _check_subdomain(value: str, what: str, flag: str) -> None:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise UserError(
            f"{what} '{value}' is not a valid Kubernetes object name: lowercase letters, digits, '-' and '.', "
            f"at most 253 characters ({flag})"
        )


def validate(spec: JobSpec, fmt: Format) -> None:
    """Raise UserError naming the flag for anything Kubernetes or the launcher would reject."""
    # In this order, so that of several mistakes the user is always told of the same one first.
    _check_pods(spec, fmt)
    _check_references(spec)
    _check_launcher(spec)
    _check_tune(spec, fmt)


def _check_pods(spec: JobSpec, fmt: Format) -> None:
    """The format, how many pods, on what image, under what names."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if spec.nodes < 1:
        raise UserError(f"--nodes must be at least 1 (got {spec.nodes})")
    if spec.min_nodes is not None and not 1 <= spec.min_nodes <= spec.nodes:
        raise UserError(f"--nodes {spec.min_nodes}:{spec.nodes}: the fewest nodes must be between 1 and the most")
    if spec.elastic:
        if fmt != "job":
            raise UserError(f"--nodes {spec.min_nodes}:{spec.nodes} (an elastic job) renders the plain Indexed Job; "
                            f"--format {fmt} has no form of it here")
        if spec.rendezvous != "c10d" or spec.max_restarts < 1:
            raise UserError(f"--nodes {spec.min_nodes}:{spec.nodes} needs --rendezvous c10d and --max-restarts of 1 or "
                            "more: the survivors of a lost node re-form through a new rendezvous round")
    if spec.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be 0 (CPU, one process per node) or more (got {spec.gpus_per_node})")
    if not spec.image or any(c.isspace() for c in spec.image):
        raise UserError("--image is required: the training image built from the Dockerfile, e.g. ghcr.io/ORG/lstm-pipeline:0.1.0")
    _check_label(spec.name, "job name", "--name")
    # The highest-rank pod's hostname must still be a DNS label, or its DNS record is never created.
    longest = pod_hostname(spec.name, fmt, spec.nodes - 1)
    if len(longest) > 63:
        room = 63 - (len(longest) - len(spec.name))
        raise UserError(
            f"job name '{spec.name}' is too long for {spec.nodes} nodes with --format {fmt}: the pod hostname "
            f"'{longest}' exceeds 63 characters; use a --name of at most {room} characters"
        )


def _check_references(spec: JobSpec) -> None:
    """The namespace, claims, data URL, Secret and queue the job's objects name."""
    if spec.namespace is not None:
        _check_label(spec.namespace, "namespace", "--namespace")
    if spec.data_pvc and spec.data_url:
        raise UserError(
            "--data-pvc and --data-url are alternatives: mount the shards from a claim or read them from a URL, not both"
        )
    for value, what, flag in (
        (spec.data_pvc, "data claim", "--data-pvc"),
        (spec.output_pvc, "output claim", "--output-pvc"),
        (spec.wandb_secret, "W&B secret", "--wandb-secret"),
    ):
        if value is not None:
            _check_subdomain(value, what, flag)
    if spec.data_url is not None and (not spec.data_url or any(c.isspace() for c in spec.data_url)):
        raise UserError(f"--data-url '{spec.data_url}' is empty or contains whitespace")
    if not _ENV_KEY.match(spec.wandb_secret_key):
        raise UserError(f"--wandb-secret-key '{spec.wandb_secret_key}' is not a valid Secret key")
    if spec.queue is not None:
        _check_label(spec.queue, "Kueue queue name", "--queue")


def _check_launcher(spec: JobSpec) -> None:
    """The launcher's port and restarts, the Job's retries, the preflight's timeout, resources and runtime."""
    if not 1 <= spec.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535 (got {spec.port})")
    if spec.max_restarts < 0:
        raise UserError(f"--max-restarts must be 0 or more (got {spec.max_restarts})")
    if spec.max_restarts and spec.rendezvous != "c10d":
        raise UserError("--max-restarts needs --rendezvous c10d: static rendezvous cannot re-admit a restarted worker")
    if spec.restarts < 0:
        raise UserError(f"--restarts must be 0 or more (got {spec.restarts})")
    if spec.wait_timeout_s < 1:
        raise UserError(f"--wait-timeout must be at least 1 second (got {spec.wait_timeout_s})")
    for value, flag in ((spec.cpu, "--cpu"), (spec.memory, "--memory")):
        if value is not None and not _QUANTITY.match(value):
            raise UserError(f"{flag} '{value}' is not a Kubernetes quantity (e.g. 8, 500m, 16Gi)")
    if not spec.runtime:
        raise UserError("--runtime must name a ClusterTrainingRuntime")


def _check_tune(spec: JobSpec, fmt: Format) -> None:
    """A tuning job: tuners that share one study, each on its own; none of a training job's rendezvous."""
    if spec.tune is None:
        return
    if fmt != "job" or spec.elastic or spec.rendezvous != "static":
        raise UserError("--tune renders an Indexed Job of independent tuners: leave out --format, --rendezvous and "
                        "--nodes MIN:MAX")
    if spec.tune.trials < 1:
        raise UserError(f"--trials must be at least 1 (got {spec.tune.trials})")
    final_seeds(spec.tune.final_seeds)  # said now, not by pod 0 once the study is over
    if spec.tune.processes < 1 or spec.procs_per_node % spec.tune.processes:
        raise UserError(f"--trial-processes {spec.tune.processes} must divide the {spec.procs_per_node} process(es) of a "
                        "pod (its GPUs, or 1 on the CPU): each worker of a tuner pod runs its trials on that many")
    if not spec.output_pvc:
        raise UserError("--tune needs --output-pvc CLAIM (a ReadWriteMany claim every pod mounts): the study's "
                        "directory is there (its journal file unless --storage names a database, the trials' runs and "
                        "checkpoints, best.yaml and the final runs), which a pod's own disk would lose with the pod")
    _check_storage(spec.tune)


def _check_storage(tune: TuneSpec) -> None:
    """A database URL with a password is refused on the command line: anyone who can read the Job would read it."""
    if tune.storage is not None and tune.storage_secret is not None:
        raise UserError("--storage and --storage-secret are alternatives: name the database once")
    if tune.storage is not None and urlsplit(tune.storage).password is not None:
        raise UserError("--storage holds a password, which would sit in the Job's spec for anyone who can read it: "
                        "put the URL in a Secret (kubectl create secret generic tune-db --from-literal=url=URL) and "
                        "pass --storage-secret tune-db")
    if tune.storage_secret is not None:
        _check_subdomain(tune.storage_secret, "storage secret", "--storage-secret")
        if not _ENV_KEY.match(tune.storage_secret_key):
            raise UserError(f"--storage-secret-key '{tune.storage_secret_key}' is not a valid Secret key")
