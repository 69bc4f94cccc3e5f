"""Submit a multi-node training job to Kubernetes, and follow it.

    python launch/submit.py --config configs/fashion_mnist.yaml --nodes 2 --gpus-per-node 1 \\
        --image ghcr.io/ORG/lstm-pipeline:0.1.0 --data-pvc lstm-data --output-pvc lstm-outputs \\
        --wandb-secret wandb [--queue team-a] [--dry-run] [key.sub=value ...]
    python launch/submit.py status NAME [--namespace NS] [--format job|jobset|trainjob]
    python launch/submit.py logs NAME [--rank R | --all] [--follow]
    python launch/submit.py delete NAME

Without --dry-run the manifests are applied to the current kube context with kubectl. With
--local the same pods are played on this machine by podman instead (a rehearsal before a
cluster; status, logs and delete take --local too):

    python launch/submit.py --config configs/cpu_test.yaml --nodes 2 --gpus-per-node 0 --image IMAGE \
        --data-pvc lstm-data --output-pvc lstm-outputs --local \
        --local-volume lstm-data=data/fashion_mnist --local-volume lstm-outputs=runs/k8s
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import run_cli
from pipeline.kube.spec import FORMATS

ACTIONS = ("status", "logs", "delete")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true",
                   help="this machine's podman instead of a cluster: the rendered pods, their DNS names, claims and secret")
    p.add_argument("--namespace", help="default: the namespace of the current kube context")
    p.add_argument("--format", choices=FORMATS, default="job",
                   help="job: Indexed Job + headless Service (no operator needed); jobset: JobSet v1alpha2; "
                        "trainjob: Kubeflow Trainer v2 TrainJob (default: job)")


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config (validated locally, shipped in a ConfigMap)")
    p.add_argument("--nodes", required=True, metavar="N|MIN:MAX",
                   help="pods (machines); MIN:MAX: an elastic job of MAX pods that goes on with as few as MIN "
                        "when pods are lost for good (c10d rendezvous; Kubernetes 1.31+)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs and processes per pod; 0 = CPU, one process")
    p.add_argument("--image", required=True, help="training image built from the Dockerfile (a fixed tag)")
    p.add_argument("--name", help="job name, a DNS label (default: from the config file name)")
    _common(p)
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-pvc", metavar="CLAIM", help="claim holding the prepared shards and manifest.json at its root")
    data.add_argument("--data-url", metavar="URL", help="base URL of the shards (the local manifest is shipped with the config)")
    p.add_argument("--output-pvc", metavar="CLAIM", help="shared (RWX) claim for outputs and checkpoints; resubmitting resumes")
    p.add_argument("--wandb-secret", metavar="SECRET", help="Secret holding the W&B API key")
    p.add_argument("--wandb-secret-key", default="api-key", help="key in that Secret (default: api-key)")
    p.add_argument("--queue", metavar="LOCALQUEUE", help="Kueue LocalQueue: the job is created suspended and queued")
    p.add_argument("--rendezvous", choices=["static", "c10d"],
                   help="static (--same_network; the default) or c10d (elastic; combine with --max-restarts); "
                        "--nodes MIN:MAX implies c10d")
    p.add_argument("--max-restarts", type=int,
                   help="in-pod worker restarts with c10d rendezvous (default 0; 3 with --nodes MIN:MAX)")
    p.add_argument("--restarts", type=int, default=1, help="whole-job restarts after failures (default: 1)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the master pod")
    p.add_argument("--cpu", help="CPUs per pod, request and limit; each process computes with limit / processes "
                                 "threads (default: processes x (1 + data.num_workers))")
    p.add_argument("--memory", help="memory request and limit per pod (default: 4Gi per process + /dev/shm)")
    p.add_argument("--wait-timeout", type=int, default=900, help="seconds a pod waits for the master before failing")
    p.add_argument("--runtime", default="torch-distributed", help="--format trainjob: ClusterTrainingRuntime name")
    p.add_argument("--local-volume", action="append", default=[], metavar="CLAIM=DIR",
                   help="--local: back a claim with a host directory (a prepared dataset, or where outputs go)")
    tune = p.add_argument_group("tuning (docs/tuning.md): each pod a tuner of one study")
    tune.add_argument("--tune", action="store_true", help="the pods run launch/tune.py on one study named after the job, "
                      "one worker per GPU, instead of one training run")
    tune.add_argument("--space", help="--tune: the search space file, e.g. configs/search/sequences.yaml")
    tune.add_argument("--trials", type=int, help="--tune: trials in the study, all pods together")
    tune.add_argument("--storage", help="--tune: a database URL the pods share, without a password (default: the "
                      "study's journal file on --output-pvc)")
    tune.add_argument("--storage-secret", metavar="SECRET", help="--tune: a Secret holding the database URL, read into "
                      "the pods' OPTUNA_STORAGE: the way to pass a password")
    tune.add_argument("--storage-secret-key", default="url", help="key in that Secret (default: url)")
    tune.add_argument("--final-seeds", help="--tune: pod 0 trains the winner with these seeds and reads test once each "
                      "(default 0,1,2; '' for none)")
    tune.add_argument("--no-refit", action="store_true", default=None, help="--tune: pod 0 trains the winner on "
                      "the train split alone (default: on the train and val cases where the trials cross-validated)")
    tune.add_argument("--trial-processes", type=int, help="--tune: processes of each trial's run (one GPU each), so a "
                      "pod of G GPUs runs G / N trials at once (default 1)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--dry-run", action="store_true", help="print the manifests (multi-document YAML) instead of applying")
    out.add_argument("--out-dir", help="write the manifests as a kustomize base into this directory instead of applying")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, validated and passed to the pods")
    return p


def action_parser(action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"submit.py {action}", description=f"{action} a submitted job (via kubectl)")
    p.add_argument("name", help="the job name given at submission")
    _common(p)
    if action == "logs":
        which = p.add_mutually_exclusive_group()
        which.add_argument("--rank", type=int, default=0, help="pod (machine rank) to show (default: 0)")
        which.add_argument("--all", action="store_true", help="all pods, each line prefixed with its pod")
        p.add_argument("--follow", "-f", action="store_true")
        p.add_argument("--max-pods", type=int, default=64, help="with --all: most pods streamed at once")
        p.add_argument("--init", action="store_true", help="--local: the init container's log instead of the trainer's")
    return p


def _node_range(text: str) -> tuple[int | None, int]:
    from pipeline.errors import UserError

    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":", 1))
            return low, high
        return None, int(text)
    except ValueError:
        raise UserError(f"--nodes takes a number of pods or MIN:MAX (got {text!r})") from None


def _volumes(items: list[str]) -> dict[str, str]:
    from pipeline.errors import UserError

    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise UserError(f"--local-volume takes CLAIM=DIR (got {' '.join(items)})")
    return dict(pairs)


def _tune(args: argparse.Namespace):
    from pipeline.errors import UserError

    given = [f for f in ("space", "trials", "storage", "storage_secret", "trial_processes", "final_seeds", "no_refit")
             if getattr(args, f) is not None]
    if not args.tune:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} only applies with --tune")
        return None
    if args.space is None or args.trials is None:
        raise UserError("--tune needs --space FILE and --trials N")
    from pipeline.kube.build import tune_spec

    return tune_spec(args.space, args.trials, args.config, args.overrides, storage=args.storage,
                     storage_secret=args.storage_secret, storage_secret_key=args.storage_secret_key,
                     processes=1 if args.trial_processes is None else args.trial_processes, refit=not args.no_refit,
                     **({} if args.final_seeds is None else {"final_seeds": args.final_seeds}))


def _action(action: str, args: argparse.Namespace) -> None:
    from pipeline.kube import kubectl, local

    if args.local:
        if action == "status":
            local.status_local(args.name)
        elif action == "logs":
            local.logs_local(args.name, None if args.all else args.rank, args.follow, args.init)
        else:
            local.delete_local(args.name)
    elif action == "status":
        kubectl.status(args.name, args.namespace, args.format)
    elif action == "logs":
        kubectl.logs(args.name, args.namespace, args.format, None if args.all else args.rank, args.follow, args.max_pods)
    else:
        kubectl.delete(args.name, args.namespace, args.format)


def main(argv: list[str]) -> int:
    from pipeline.errors import UserError
    from pipeline.kube import build_spec
    from pipeline.kube.actions import recorded_command, submit

    if argv and argv[0] in ACTIONS:
        _action(argv[0], action_parser(argv[0]).parse_args(argv[1:]))
        return 0
    args = submit_parser().parse_args(argv)
    if args.local_volume and not args.local:
        raise UserError("--local-volume only applies with --local (on a cluster, claims are PersistentVolumeClaims)")
    min_nodes, nodes = _node_range(args.nodes)
    rendezvous, max_restarts = args.rendezvous, args.max_restarts
    if min_nodes is not None and min_nodes < nodes:  # elastic: c10d, and restarts to re-form after a loss
        rendezvous = "c10d" if rendezvous is None else rendezvous
        max_restarts = 3 if max_restarts is None else max_restarts
    spec = build_spec(
        args.config, args.format, tune=_tune(args),
        name=args.name, image=args.image, nodes=nodes, min_nodes=min_nodes, gpus_per_node=args.gpus_per_node,
        namespace=args.namespace, data_pvc=args.data_pvc, data_url=args.data_url, output_pvc=args.output_pvc,
        wandb_secret=args.wandb_secret, wandb_secret_key=args.wandb_secret_key, queue=args.queue,
        rendezvous=rendezvous or "static", max_restarts=max_restarts or 0, restarts=args.restarts, port=args.port,
        cpu=args.cpu, memory=args.memory, wait_timeout_s=args.wait_timeout, runtime=args.runtime,
        overrides=args.overrides,
    )
    if args.local:
        if args.dry_run or args.out_dir:
            raise UserError("--local plays the job; --dry-run and --out-dir only render it")
        from pipeline.kube.local import submit_local

        submit_local(spec, args.format, _volumes(args.local_volume))
        return 0
    submit(spec, args.format, args.dry_run, args.out_dir, recorded_command(argv))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
