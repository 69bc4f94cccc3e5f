"""Talk to the current kube context through kubectl: apply, status, logs, delete.

kubectl rather than a client library: it honours the user's kubeconfig, auth plugins and
context exactly as their own shell does, and adds no dependency to the training image.
"""

from __future__ import annotations

import shutil
import subprocess

from pipeline.errors import UserError
from pipeline.kube.render import JOBSET_API, TRAINJOB_API
from pipeline.kube.spec import INSTANCE_LABEL, TRAINER_CONTAINER, TRAINJOB_CONTAINER, Format

# Every rendered object carries this label = the job name (see JobSpec.labels).
# Set by the Job controller on Indexed Job pods (JobSet's Jobs too).
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

_TOP_KIND = {"job": "jobs.batch", "jobset": f"jobsets.{JOBSET_API.split('/')[0]}",
             "trainjob": f"trainjobs.{TRAINJOB_API.split('/')[0]}"}
_CONTAINER = {"job": TRAINER_CONTAINER, "jobset": TRAINER_CONTAINER, "trainjob": TRAINJOB_CONTAINER}


def kubectl_path() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise UserError(
            "kubectl is not on PATH: install it (https://kubernetes.io/docs/tasks/tools/) and select a context, "
            "or use --dry-run to print the manifests and apply them yourself"
        )
    return path


def _run(args: list[str], namespace: str | None, stdin: str | None = None) -> None:
    cmd = [kubectl_path(), *args]
    if namespace:
        cmd += ["--namespace", namespace]
    # kubectl's own output and errors go straight to the user's terminal.
    result = subprocess.run(cmd, input=stdin, text=True)
    if result.returncode != 0:
        raise UserError(f"'{' '.join(['kubectl', *args])}' failed with exit status {result.returncode} (its message is above)")


def apply(manifests: str, namespace: str | None) -> None:
    _run(["apply", "-f", "-"], namespace, stdin=manifests)


def status(name: str, namespace: str | None, fmt: Format) -> None:
    selector = f"{INSTANCE_LABEL}={name}"
    _run(["get", _TOP_KIND[fmt], name, "-o", "wide"], namespace)
    _run(["get", "pods", "-l", selector, "-o", "wide", "-L", INDEX_LABEL], namespace)


def logs(name: str, namespace: str | None, fmt: Format, rank: int | None, follow: bool, max_pods: int) -> None:
    selector = f"{INSTANCE_LABEL}={name}"
    args = ["logs", "-c", _CONTAINER[fmt], "--tail=-1", "--prefix"]
    if rank is not None:
        selector += f",{INDEX_LABEL}={rank}"
    else:
        args += ["--max-log-requests", str(max_pods)]
    if follow:
        args.append("--follow")
    _run([*args, "-l", selector], namespace)


def delete(name: str, namespace: str | None, fmt: Format) -> None:
    # Foreground: the pods are gone when this returns, so a resubmission cannot meet old ranks.
    kinds = {"job": "jobs.batch,services,configmaps", "jobset": f"{_TOP_KIND['jobset']},configmaps",
             "trainjob": f"{_TOP_KIND['trainjob']},configmaps"}[fmt]
    _run(["delete", kinds, "-l", f"{INSTANCE_LABEL}={name}", "--cascade=foreground", "--ignore-not-found"], namespace)
