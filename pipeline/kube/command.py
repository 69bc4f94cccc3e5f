"""The command lines a pod runs, built from a spec and a set of paths.

The renderers put `pod_command(spec, pod_paths(spec))` into the container; the pod simulation
test calls the same function with local paths and expands `$(VAR)` the way the kubelet does,
so what runs locally is what the cluster runs, not a re-typed copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.distributed.cpu_threads import AUTO_THREADS
from pipeline.kube.spec import CONFIG_MOUNT, DATA_MOUNT, OUTPUT_MOUNT, JobSpec

CONFIG_KEY = "config.yaml"
SPACE_KEY = "space.yaml"
MANIFEST_KEY = "manifest.json"
# Set by the Job controller in every container of an Indexed Job (JobSet's Jobs too).
RANK_VAR = "JOB_COMPLETION_INDEX"
MASTER_ADDR_VAR = "MASTER_ADDR"
MASTER_PORT_VAR = "MASTER_PORT"
# Keys the renderer owns: the pods must read and write the mounted volumes.
OWNED_KEYS = ("output_dir", "data.dir", "data.base_url")


@dataclass(frozen=True)
class PodPaths:
    config_file: str
    data_dir: str
    output_dir: str


def pod_paths(spec: JobSpec) -> PodPaths:
    # With --data-url the manifest travels in the ConfigMap next to the config; shards come from the URL.
    data_dir = CONFIG_MOUNT if spec.data_url else DATA_MOUNT
    # One directory per job on the shared claim: a resubmitted job with the same name resumes there.
    return PodPaths(f"{CONFIG_MOUNT}/{CONFIG_KEY}", data_dir, f"{OUTPUT_MOUNT}/{spec.name}")


def _ref(var: str) -> str:
    return f"$({var})"


def config_overrides(spec: JobSpec, paths: PodPaths) -> list[str]:
    """The user's overrides, then the volume paths (last wins in pipeline.config)."""
    owned = [f"output_dir={paths.output_dir}", f"data.dir={paths.data_dir}"]
    if spec.data_url:
        owned.append(f"data.base_url={spec.data_url}")
    elif spec.data_pvc:
        # A base_url left in the user's file would send the pods to the network instead of the claim.
        owned.append("data.base_url=null")
    return [*spec.overrides, *owned]


def accelerate_args(spec: JobSpec) -> list[str]:
    """Every multi-node flag explicit: defaults differ between accelerate, torchrun and operators."""
    args = [
        "--num_machines", str(spec.nodes),
        "--num_processes", str(spec.total_processes),  # total over all machines, not per node
        "--machine_rank", _ref(RANK_VAR),  # omitting it crashes (huggingface/accelerate#3206)
        "--main_process_ip", _ref(MASTER_ADDR_VAR),
        "--main_process_port", _ref(MASTER_PORT_VAR),
    ]
    if spec.total_processes > 1:
        # Also the CPU path: the trainer builds Accelerator(cpu=True) and DDP runs on gloo.
        args.append("--multi_gpu")
    if spec.rendezvous == "c10d":
        args += ["--rdzv_backend", "c10d", "--max_restarts", str(spec.max_restarts)]
    else:
        args.append("--same_network")
    if spec.elastic:
        args += ["--min_machines", str(spec.min_nodes)]  # launch/node.py's own: torchrun's --nnodes MIN:MAX
    # The trainer's Accelerator(mixed_precision=...) decides; repeating it keeps the launcher
    # from warning about defaults and from exporting a different value to the workers.
    args += ["--mixed_precision", spec.mixed_precision, "--dynamo_backend", "no"]
    # 0: each rank counts its threads from the pod's CPU limit (accelerate's default would be 1).
    args += ["--num_cpu_threads_per_process", AUTO_THREADS]
    return args


def tune_command(spec: JobSpec, paths: PodPaths) -> list[str]:
    """A tuner pod: launch/tune.py on the study named after the job, in output_dir on the shared claim (or in
    --storage); one worker per GPU, or per --trial-processes GPUs. Only pod 0 trains the winner with the final
    seeds."""
    tune = spec.tune
    return [
        "python", "launch/tune.py", "--config", paths.config_file, *config_overrides(spec, paths),
        "--space", f"{CONFIG_MOUNT}/{SPACE_KEY}", "--trials", str(tune.trials),
        "--workers", str(spec.procs_per_node // tune.processes), "--processes", str(tune.processes),
        "--study", spec.name, "--dir", paths.output_dir, *(["--storage", tune.storage] if tune.storage else []),
        "--final-seeds", tune.final_seeds, *([] if tune.refit else ["--no-refit"]), "--index", _ref(RANK_VAR),
    ]


def pod_command(spec: JobSpec, paths: PodPaths) -> list[str]:
    """The trainer container's full command line (with $(VAR) references for the kubelet).

    launch/node.py is `accelerate launch` with its failures in plain words and the worker's exit
    code passed on to the pod (pipeline/distributed/launcher.py)."""
    if spec.tune is not None:
        return tune_command(spec, paths)
    return [
        "python", "launch/node.py", *accelerate_args(spec),
        "launch/train.py", "--config", paths.config_file, *config_overrides(spec, paths),
        "--resume", "auto",
    ]


def preflight_command(spec: JobSpec, paths: PodPaths) -> list[str]:
    """The init container: check config and data, and (rank > 0) wait for the master's port."""
    return [
        "python", "-m", "pipeline.kube.preflight",
        "--config", paths.config_file,
        # A tuner waits for no master: every pod of a tuning job checks as rank 0 does.
        "--rank", "0" if spec.tune is not None else _ref(RANK_VAR),
        "--master-addr", _ref(MASTER_ADDR_VAR),
        "--master-port", _ref(MASTER_PORT_VAR),
        "--timeout", str(spec.wait_timeout_s),
        *config_overrides(spec, paths),
    ]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_env_refs(args: list[str], env: Mapping[str, str]) -> list[str]:
    """Kubelet expansion of command/args: $(VAR) from the container env, $$ escapes, unknown refs stay."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return [_VAR_REF.sub(sub, arg) for arg in args]
