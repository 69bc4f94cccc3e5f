"""What launch/submit.py does once its arguments are parsed (status/logs/delete: see kubectl.py)."""

from __future__ import annotations

import shlex
import sys

from pipeline.kube import kubectl
from pipeline.kube.command import pod_paths
from pipeline.kube.kustomize import write_base
from pipeline.kube.render import render, to_yaml
from pipeline.kube.spec import Format, JobSpec


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _warnings(spec: JobSpec) -> None:
    if not spec.output_pvc:
        _warn("no --output-pvc: checkpoints live in the pods' emptyDir and are lost when they end; "
              "a restarted job starts from scratch")
    tag = spec.image.rsplit("/", 1)[-1]
    if "@" not in tag and (":" not in tag or tag.endswith(":latest")):
        _warn(f"image {spec.image} has no fixed tag: nodes that pull at different times may run different code")


def submit(spec: JobSpec, fmt: Format, dry_run: bool, out_dir: str | None = None, command: str = "") -> None:
    docs = render(spec, fmt)
    if out_dir:
        for path in write_base(docs, out_dir, command):
            print(f"wrote {path}", file=sys.stderr)
        return
    text = to_yaml(docs)
    _warnings(spec)
    if dry_run:
        sys.stdout.write(text)
        return
    kubectl.apply(text, spec.namespace)
    ns = f" --namespace {spec.namespace}" if spec.namespace else ""
    fmt_flag = f" --format {fmt}" if fmt != "job" else ""
    print(
        f"submitted {fmt} {spec.name}: {f'{spec.min_nodes} to ' if spec.elastic else ''}{spec.nodes} node(s) x "
        f"{spec.procs_per_node} process(es), "
        f"outputs in {pod_paths(spec).output_dir}, W&B group {spec.name}\n"
        f"  python launch/submit.py status {spec.name}{ns}{fmt_flag}\n"
        f"  python launch/submit.py logs {spec.name}{ns}{fmt_flag} --follow\n"
        f"  python launch/submit.py delete {spec.name}{ns}{fmt_flag}",
        file=sys.stderr,
    )


def recorded_command(argv: list[str]) -> str:
    """The submit command line minus --out-dir, as written into a generated kustomization."""

    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--out-dir":
            skip = True
            continue
        if arg.startswith("--out-dir="):
            continue
        kept.append(arg)
    return shlex.join(["python", "launch/submit.py", *kept])
