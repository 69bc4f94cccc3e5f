"""Kubernetes renderings, offline: strict schema validation, wiring, CLI errors, kubectl calls.

There is no cluster here. The batch/v1 and core/v1 objects are validated with
kubernetes-validate --strict for every Kubernetes version from 1.29 to the newest it bundles;
JobSet and TrainJob are CRDs it has no schema for, so their embedded Job / pod parts are
wrapped into a batch/v1 Job or a v1 Pod and validated the same way, and their CRD-level keys
are checked against the field lists of the versions we target.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_py

from pipeline.errors import ConfigError, DataError, UserError
from pipeline.kube import (
    build_spec,
    expand_env_refs,
    master_address,
    pod_command,
    pod_paths,
    preflight_command,
    render,
)
from pipeline.kube.kustomize import generating_command
from pipeline.kube.preflight import MasterUnreachable, wait_for_tcp
from pipeline.kube.preflight import main as preflight_main

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")

K8S_BASE = ROOT / "k8s" / "base"
IMAGE = "ghcr.io/example/lstm-pipeline:0.1.0"


def _versions() -> list[str]:
    from kubernetes_validate.utils import all_versions

    picked = [v for v in all_versions() if tuple(int(p) for p in v.split(".")[:2]) >= (1, 29)]
    assert picked, "kubernetes-validate bundles no schema for 1.29 or newer"
    return sorted(picked, key=lambda v: tuple(int(p) for p in v.split(".")))


VERSIONS = _versions()


def _strict(doc: dict) -> None:
    for version in VERSIONS:
        kv.validate(doc, version, strict=True)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": "runs/tiny",
        "data": {"dir": str(tmp_path / "no-data-here"), "num_workers": 2},
        "train": {"max_steps": 20},
        "eval": {"every_steps": 10},
        "wandb": {"project": "kube-tests", "entity": "team"},
    }))
    return path


def _spec(config: Path, **kw):
    options = dict(image=IMAGE, nodes=2, gpus_per_node=4, data_pvc="lstm-data", output_pvc="lstm-out",
                   wandb_secret="wandb")
    options.update(kw)
    fmt = options.pop("fmt", "job")
    return build_spec(config, fmt, **options)


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def _container(pod: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    return next(c for c in pod[key] if c["name"] == name)


# --- strict schema validation ------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    {},
    {"queue": "team-a", "namespace": "ml"},
    {"gpus_per_node": 0, "output_pvc": None, "wandb_secret": None},
    {"nodes": 1, "gpus_per_node": 1, "rendezvous": "c10d", "max_restarts": 3},
])
def test_default_rendering_passes_strict_schema(config, variant):
    docs = render(_spec(config, **variant))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        _strict(doc)


def test_strict_validation_catches_a_misspelled_field(config):
    job = _by_kind(render(_spec(config)))["Job"]
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(job, VERSIONS[-1], strict=True)


# Field names per CRD version we render, from kubernetes-sigs/jobset api/jobset/v1alpha2
# (v0.12) and kubeflow/trainer pkg/apis/trainer/v1alpha1 (v2.3).
JOBSET_SPEC_KEYS = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
                    "coordinator", "managedBy", "ttlSecondsAfterFinished", "volumeClaimPolicies"}
JOBSET_NETWORK_KEYS = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
JOBSET_RJOB_KEYS = {"name", "groupName", "template", "replicas", "dependsOn"}
TRAINJOB_SPEC_KEYS = {"runtimeRef", "initializer", "trainer", "runtimePatches", "suspend", "activeDeadlineSeconds",
                      "managedBy"}
TRAINJOB_TRAINER_KEYS = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}
TRAINJOB_POD_PATCH_KEYS = {"serviceAccountName", "volumes", "initContainers", "containers", "imagePullSecrets",
                           "securityContext", "nodeSelector", "affinity", "tolerations", "schedulingGates",
                           "terminationGracePeriodSeconds"}
TRAINJOB_CONTAINER_PATCH_KEYS = {"name", "env", "volumeMounts", "securityContext"}


@pytest.mark.parametrize("queue", [None, "team-a"])
def test_jobset_rendering(config, queue):
    docs = render(_spec(config, fmt="jobset", queue=queue), "jobset")
    cm, js = docs
    _strict(cm)
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
    assert set(js["spec"]) <= JOBSET_SPEC_KEYS
    assert set(js["spec"]["network"]) <= JOBSET_NETWORK_KEYS
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "tiny", "publishNotReadyAddresses": True}
    (rjob,) = js["spec"]["replicatedJobs"]
    assert set(rjob) <= JOBSET_RJOB_KEYS and rjob["replicas"] == 1
    # The replicated job's template is a batch/v1 JobTemplateSpec: validate it as a Job.
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "tiny-node-0", **rjob["template"]["metadata"]},
           "spec": rjob["template"]["spec"]}
    _strict(job)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert "subdomain" not in pod  # JobSet sets it from network.subdomain
    env = {e["name"]: e.get("value") for e in _container(pod, "trainer")["env"]}
    assert env["MASTER_ADDR"] == "tiny-node-0-0.tiny"
    assert (js["spec"].get("suspend") is True) == bool(queue)
    assert (js["metadata"]["labels"].get("kueue.x-k8s.io/queue-name")) == queue


def test_trainjob_rendering(config):
    cm, tj = render(_spec(config, fmt="trainjob", queue="team-a"), "trainjob")
    _strict(cm)
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    spec = tj["spec"]
    assert set(spec) <= TRAINJOB_SPEC_KEYS and spec["suspend"] is True
    assert set(spec["trainer"]) <= TRAINJOB_TRAINER_KEYS
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 4
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod_patch = rjob["template"]["spec"]["template"]["spec"]
    assert set(pod_patch) <= TRAINJOB_POD_PATCH_KEYS
    for c in pod_patch["containers"]:
        assert set(c) <= TRAINJOB_CONTAINER_PATCH_KEYS
    # Merge trainer + patch into the pod the runtime would create, and validate that pod.
    (cpatch,) = pod_patch["containers"]
    container = {"name": cpatch["name"], "image": spec["trainer"]["image"], "command": spec["trainer"]["command"],
                 "env": spec["trainer"]["env"], "resources": spec["trainer"]["resourcesPerNode"],
                 "volumeMounts": cpatch["volumeMounts"], "securityContext": cpatch["securityContext"]}
    pod_spec = {k: v for k, v in pod_patch.items() if k != "containers"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tiny-node-0-0"},
           "spec": {**pod_spec, "containers": [container], "restartPolicy": "Never"}}
    _strict(pod)
    mounted = {m["name"] for m in cpatch["volumeMounts"]}
    assert mounted <= {v["name"] for v in pod_patch["volumes"]}


# --- wiring ---------------------------------------------------------------------------------

def test_job_wiring(config):
    spec = _spec(config, nodes=3, gpus_per_node=4)
    docs = _by_kind(render(spec))
    svc, job, cm = docs["Service"], docs["Job"], docs["ConfigMap"]
    pod_meta, pod = job["spec"]["template"]["metadata"], job["spec"]["template"]["spec"]

    # The headless Service selects exactly this job's pods, and the pods' subdomain is the Service.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= pod_meta["labels"].items()
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert "selector" not in job["spec"]  # the Job controller generates its own

    js = job["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"] == 3
    assert pod["restartPolicy"] == "Never" and js["podReplacementPolicy"] == "Failed"
    assert js["backoffLimit"] == spec.restarts * spec.nodes == 3  # default restarts 1, three pods
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail_fast = {r["onExitCodes"]["containerName"]: r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob"}
    assert fail_fast == {"preflight": [1, 2], "trainer": [2, 3]}  # bad config, diverged

    trainer = _container(pod, "trainer")
    env = {e["name"]: e for e in trainer["env"]}
    # Master = pod of index 0 under the Service; pods of index i are named <job>-i.
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}" == "tiny-0.tiny"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["WANDB_RUN_GROUP"]["value"] == job["metadata"]["name"]
    assert env["WANDB_PROJECT"]["value"] == "kube-tests" and env["WANDB_ENTITY"]["value"] == "team"
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}

    cmd = trainer["command"]
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag("--num_machines") == "3" and flag("--num_processes") == "12"  # total over machines
    assert flag("--machine_rank") == "$(JOB_COMPLETION_INDEX)"
    assert flag("--main_process_ip") == "$(MASTER_ADDR)" and flag("--main_process_port") == "$(MASTER_PORT)"
    assert "--multi_gpu" in cmd and "--same_network" in cmd
    assert flag("--mixed_precision") == "no"  # the config's train.mixed_precision
    assert cmd[cmd.index("launch/train.py"):][:3] == ["launch/train.py", "--config", "/etc/pipeline/config.yaml"]
    assert cmd[-2:] == ["--resume", "auto"]
    assert "output_dir=/outputs/tiny" in cmd and "data.dir=/data" in cmd

    # The ranks the kubelet will substitute: 0..N-1, each pod with its own command line.
    ranks = []
    for index in range(js["completions"]):
        expanded = expand_env_refs(cmd, {"JOB_COMPLETION_INDEX": str(index), "MASTER_ADDR": "m", "MASTER_PORT": "1"})
        ranks.append(int(expanded[expanded.index("--machine_rank") + 1]))
    assert ranks == [0, 1, 2]

    res = trainer["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 4 and res["requests"]["nvidia.com/gpu"] == 4
    assert {"cpu", "memory"} <= set(res["requests"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["dshm"]["emptyDir"]["sizeLimit"] == "2Gi"  # 4 processes x 2 loader workers x 256Mi
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert vols["data"]["persistentVolumeClaim"] == {"claimName": "lstm-data", "readOnly": True}
    assert vols["outputs"]["persistentVolumeClaim"] == {"claimName": "lstm-out"}
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert mounts == {"/etc/pipeline": "config", "/data": "data", "/dev/shm": "dshm", "/outputs": "outputs",
                      "/tmp": "scratch", "/home/app": "scratch"}
    assert trainer["securityContext"]["readOnlyRootFilesystem"] is True, "writable paths live on the scratch volume"
    # The config shipped is the user's file, byte for byte.
    assert cm["data"]["config.yaml"] == config.read_text()

    for c in [*pod["initContainers"], *pod["containers"]]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}

    # The init container waits for the master's port, with the same rank and address.
    pre = _container(pod, "preflight", init=True)
    assert pre["command"][:3] == ["python", "-m", "pipeline.kube.preflight"]
    assert {e["name"]: e["value"] for e in pre["env"]} == {"MASTER_ADDR": "tiny-0.tiny", "MASTER_PORT": "29500"}
    assert "$(JOB_COMPLETION_INDEX)" in pre["command"]


def test_container_command_is_the_pod_command_function(config):
    """The simulation test builds commands with pod_command(); the manifest must hold the same."""
    spec = _spec(config)
    pod = _by_kind(render(spec))["Job"]["spec"]["template"]["spec"]
    assert _container(pod, "trainer")["command"] == pod_command(spec, pod_paths(spec))
    assert _container(pod, "preflight", init=True)["command"] == preflight_command(spec, pod_paths(spec))


def test_cpu_job_runs_one_process_per_pod_without_gpu_limits(config):
    spec = _spec(config, gpus_per_node=0, nodes=2)
    pod = _by_kind(render(spec))["Job"]["spec"]["template"]["spec"]
    trainer = _container(pod, "trainer")
    cmd = trainer["command"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert "nvidia.com/gpu" not in json.dumps(trainer["resources"]) and "tolerations" not in pod


def test_single_process_job_has_no_multi_gpu_flag(config):
    cmd = pod_command(_spec(config, nodes=1, gpus_per_node=1), pod_paths(_spec(config, nodes=1, gpus_per_node=1)))
    assert "--multi_gpu" not in cmd and cmd[cmd.index("--num_processes") + 1] == "1"


def test_c10d_rendezvous_flags(config):
    spec = _spec(config, rendezvous="c10d", max_restarts=3)
    cmd = pod_command(spec, pod_paths(spec))
    assert cmd[cmd.index("--rdzv_backend") + 1] == "c10d" and cmd[cmd.index("--max_restarts") + 1] == "3"
    assert "--same_network" not in cmd


def test_kueue_queue_suspends_and_labels_the_job(config):
    job = _by_kind(render(_spec(config, queue="team-a")))["Job"]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    plain = _by_kind(render(_spec(config)))["Job"]
    assert "suspend" not in plain["spec"] and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_data_url_ships_the_manifest_and_sets_base_url(config, fashion_shards, tmp_path):
    cfg = tmp_path / "url.yaml"
    cfg.write_text(config.read_text().replace(str(tmp_path / "no-data-here"), str(fashion_shards)))
    spec = _spec(cfg, data_pvc=None, data_url="https://shards.example.org/fmnist")
    docs = _by_kind(render(spec))
    manifest = json.loads(docs["ConfigMap"]["data"]["manifest.json"])
    assert manifest == json.loads((fashion_shards / "manifest.json").read_text())
    cmd = _container(docs["Job"]["spec"]["template"]["spec"], "trainer")["command"]
    assert "data.base_url=https://shards.example.org/fmnist" in cmd and "data.dir=/etc/pipeline" in cmd
    assert "data" not in {v["name"] for v in docs["Job"]["spec"]["template"]["spec"]["volumes"]}
    for doc in docs.values():
        _strict(doc)


def test_kubelet_expansion_rules():
    env = {"A": "1", "B": "x y"}
    args = ["$(A)", "-$(B)-", "$(C)", "$$(A)", "$$", "plain"]
    assert expand_env_refs(args, env) == ["1", "-x y-", "$(C)", "$(A)", "$", "plain"]


# --- validation errors ------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"nodes": 0}, "--nodes must be at least 1"),
    ({"gpus_per_node": -1}, "--gpus-per-node"),
    ({"image": ""}, "--image is required"),
    ({"name": "Bad_Name"}, "not a valid DNS label"),
    ({"name": "a" * 64}, "at most 63"),
    ({"name": "a" * 61, "nodes": 12}, "pod hostname"),
    ({"data_url": "https://x"}, "not both"),
    ({"namespace": "ML"}, "namespace"),
    ({"queue": "q_1"}, "Kueue queue name"),
    ({"max_restarts": 2}, "--rendezvous c10d"),
    ({"memory": "lots"}, "--memory"),
    ({"wandb_secret": "Bad Secret"}, "--wandb-secret"),
])
def test_bad_values_raise_user_errors(config, kw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _spec(config, **kw)


def test_jobset_names_leave_room_for_the_longer_hostnames(config):
    _spec(config, name="a" * 55)  # fine as a Job: a...a-1
    with pytest.raises(UserError, match="pod hostname"):
        _spec(config, name="a" * 55, fmt="jobset")


def test_overrides_are_validated_and_owned_keys_refused(config):
    with pytest.raises(ConfigError, match="train.max_steps"):
        _spec(config, overrides=["train.max_steps=-3"])
    with pytest.raises(UserError, match="output_dir is set by submit"):
        _spec(config, overrides=["output_dir=/elsewhere"])
    spec = _spec(config, overrides=["train.max_steps=15"])
    cmd = pod_command(spec, pod_paths(spec))
    # User overrides first, volume paths last: the renderer's paths win.
    assert cmd.index("train.max_steps=15") < cmd.index("output_dir=/outputs/tiny")


def test_missing_data_source_is_a_user_error(config):
    with pytest.raises(UserError, match="--data-pvc CLAIM"):
        _spec(config, data_pvc=None)
    with pytest.raises(DataError, match="prepare_data.py"):
        _spec(config, data_pvc=None, data_url="https://x/shards")  # no local manifest to ship


# --- the CLI as a user runs it ----------------------------------------------------------------

def _submit(*args: str, env: dict | None = None):
    return run_py("launch/submit.py", *args, env=env, timeout=120)


BASE_ARGS = ["--nodes", "2", "--gpus-per-node", "1", "--image", IMAGE, "--data-pvc", "lstm-data"]


@pytest.mark.parametrize("args, code, message", [
    (["--nodes", "0"], 1, "--nodes must be at least 1"),
    (["--gpus-per-node", "-2"], 1, "--gpus-per-node"),
    (["--name", "x" * 70], 1, "at most 63"),
    (["--name", "UPPER"], 1, "not a valid DNS label"),
    (["--data-url", "https://x"], 2, "not allowed with argument --data-pvc"),
    (["train.max_steps=0"], 2, "train.max_steps"),
    (["--format", "pytorchjob"], 2, "invalid choice"),
])
def test_cli_rejects_bad_values_without_traceback(config, args, code, message):
    # Later flags win in argparse, so each case overrides one value of BASE_ARGS.
    proc = _submit("--config", str(config), *BASE_ARGS, *args, "--dry-run")
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_missing_image_and_missing_config(config, tmp_path):
    proc = _submit("--config", str(config), "--nodes", "2", "--gpus-per-node", "1", "--dry-run")
    assert proc.returncode == 2 and "--image" in proc.stderr and "Traceback" not in proc.stderr
    proc = _submit("--config", str(tmp_path / "nope.yaml"), *BASE_ARGS, "--dry-run")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_dry_run_prints_multi_document_yaml(config):
    proc = _submit("--config", str(config), *BASE_ARGS, "--name", "demo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert docs[2]["metadata"]["name"] == "demo"


def _fake_kubectl(tmp_path: Path) -> tuple[dict, Path]:
    """A kubectl on PATH that records its arguments and stdin, one JSON line per call."""
    bindir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bindir.mkdir()
    script = bindir / "kubectl"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"stdin = sys.stdin.read() if '-f' in sys.argv else ''\n"
        f"open({str(log)!r}, 'a').write(json.dumps({{'args': sys.argv[1:], 'stdin': stdin}}) + '\\n')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    return env, log


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_cli_applies_through_kubectl_and_follows_the_job(config, tmp_path):
    env, log = _fake_kubectl(tmp_path)
    proc = _submit("--config", str(config), *BASE_ARGS, "--name", "demo", "--namespace", "ml", env=env)
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(log)
    assert call["args"] == ["apply", "-f", "-", "--namespace", "ml"]
    assert [d["kind"] for d in yaml.safe_load_all(call["stdin"])] == ["ConfigMap", "Service", "Job"]
    assert "launch/submit.py logs demo" in proc.stderr and "--output-pvc" in proc.stderr  # next steps + warning

    actions = (["status", "demo"], ["logs", "demo", "--all", "--follow"], ["logs", "demo", "--rank", "1"], ["delete", "demo"])
    for action in actions:
        assert _submit(*action, "--namespace", "ml", env=env).returncode == 0
    status_job, status_pods, logs_all, logs_one, delete = (c["args"] for c in _calls(log)[1:])
    assert status_job[:3] == ["get", "jobs.batch", "demo"]
    assert "app.kubernetes.io/instance=demo" in status_pods
    assert logs_all[logs_all.index("-l") + 1] == "app.kubernetes.io/instance=demo" and "--follow" in logs_all
    assert logs_one[logs_one.index("-l") + 1].endswith("batch.kubernetes.io/job-completion-index=1")
    assert logs_one[logs_one.index("-c") + 1] == "trainer"
    assert delete[:2] == ["delete", "jobs.batch,services,configmaps"] and delete[-2:] == ["--namespace", "ml"]


def test_cli_without_kubectl_says_so(config, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = _submit("--config", str(config), *BASE_ARGS, env={"PATH": str(empty)})
    assert proc.returncode == 1 and "kubectl is not on PATH" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the committed kustomize base -------------------------------------------------------------

def _regenerate_base(tmp_path: Path) -> Path:
    command = shlex.split(generating_command(K8S_BASE))
    assert command[:2] == ["python", "launch/submit.py"]
    out = tmp_path / "base"
    proc = run_py(*command[1:], "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_committed_base_equals_a_fresh_rendering(tmp_path):
    fresh = _regenerate_base(tmp_path)
    committed = sorted(p.name for p in K8S_BASE.glob("*.yaml"))
    assert committed == sorted(p.name for p in fresh.glob("*.yaml"))
    for name in committed:
        assert (K8S_BASE / name).read_text() == (fresh / name).read_text(), (
            f"k8s/base/{name} is stale; regenerate with: {generating_command(K8S_BASE)} --out-dir k8s/base"
        )


def test_committed_base_is_a_two_node_strictly_valid_job():
    docs = [yaml.safe_load((K8S_BASE / name).read_text()) for name in yaml.safe_load(
        (K8S_BASE / "kustomization.yaml").read_text())["resources"]]
    kinds = _by_kind(docs)
    assert kinds["Job"]["spec"]["completions"] == 2
    for doc in docs:
        _strict(doc)


def test_kubectl_kustomize_renders_the_base():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (apt-get install kubectl, or see kubernetes.io/docs/tasks/tools)")
    proc = subprocess.run(["kubectl", "kustomize", str(K8S_BASE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = _by_kind(list(yaml.safe_load_all(proc.stdout)))
    for name in yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())["resources"]:
        doc = yaml.safe_load((K8S_BASE / name).read_text())
        assert built[doc["kind"]] == doc


# --- the init container -----------------------------------------------------------------------

def test_wait_for_tcp_returns_once_the_port_listens_and_times_out_otherwise():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert wait_for_tcp("127.0.0.1", port, timeout_s=5, interval_s=0.1) < 5
    with pytest.raises(MasterUnreachable, match="did not accept a connection") as err:
        wait_for_tcp("127.0.0.1", port, timeout_s=0.5, interval_s=0.1)
    assert err.value.exit_code == 3  # retried by the Job, unlike 1 and 2


def test_preflight_exit_codes_match_the_pod_failure_policy(config, fashion_shards, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ndata: {dir: d}\ntrain: {max_stepz: 3}\n")
    base = ["--rank", "0", "--master-addr", "127.0.0.1", "--master-port", "1"]
    proc = run_py("-m", "pipeline.kube.preflight", "--config", str(bad), *base)
    assert proc.returncode == ConfigError.exit_code == 2 and "max_stepz" in proc.stderr
    proc = run_py("-m", "pipeline.kube.preflight", "--config", str(config), *base)
    assert proc.returncode == DataError.exit_code == 1 and "manifest.json" in proc.stderr
    assert preflight_main(["--config", str(config), *base, f"data.dir={fashion_shards}"]) == 0


def test_master_address_matches_pod_hostnames(config):
    spec = _spec(config)
    assert master_address(spec, "job") == "tiny-0.tiny"
    assert master_address(spec, "jobset") == master_address(spec, "trainjob") == "tiny-node-0-0.tiny"


def test_render_does_not_mutate_between_calls(config):
    spec = _spec(config)
    first = render(spec)
    again = copy.deepcopy(first)
    for doc in first:  # a caller editing its documents must not reach the next rendering
        for rule in doc.get("spec", {}).get("podFailurePolicy", {}).get("rules", []):
            rule.get("onExitCodes", {}).get("values", []).append(99)
    assert render(spec) == again


# --- the local rehearsal's pods (submit.py --local) ---------------------------------------

def test_local_pods_are_the_jobs_template_plus_what_the_job_controller_and_kubelet_add(config):
    from pipeline.kube import local_pods

    spec = _spec(config, gpus_per_node=0, name="rehearse")
    template = copy.deepcopy(_by_kind(render(spec))["Job"]["spec"]["template"]["spec"])
    (config_map, pod), scratch = local_pods.pod_documents(spec, 1)
    assert config_map == _by_kind(render(spec))["ConfigMap"]
    _strict(pod)  # still a valid v1 Pod
    assert pod["metadata"]["name"] == pod["spec"]["hostname"] == "rehearse-1" and pod["spec"]["subdomain"] == "rehearse"
    assert pod["metadata"]["labels"][local_pods.INDEX_LABEL] == "1"
    assert pod["spec"]["securityContext"] == template["securityContext"]
    for kind in ("initContainers", "containers"):
        for ours, theirs in zip(pod["spec"][kind], template[kind], strict=True):
            env = {e["name"]: e["value"] for e in ours["env"] if "value" in e}
            assert env["JOB_COMPLETION_INDEX"] == "1"
            assert ours["command"] == expand_env_refs(theirs["command"], env) and "$(" not in " ".join(ours["command"])
            assert "ports" not in ours and ours["securityContext"] == theirs["securityContext"]
    # Each emptyDir mount is a directory of this pod alone: /tmp and HOME are not one directory, nor another pod's.
    assert not [v for v in pod["spec"]["volumes"] if "emptyDir" in v]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: paths[m["name"]] for m in _container(pod["spec"], "trainer")["volumeMounts"]
              if m["name"] in paths}
    assert set(mounts) == {"/tmp", "/home/app", "/dev/shm"} and len(set(mounts.values())) == 3
    assert all("/rehearse-1/" in p for p in mounts.values()) and sorted(map(str, scratch)) == sorted(mounts.values())
    assert mounts["/dev/shm"].startswith("/dev/shm/")  # medium: Memory stays in memory
    (_, pod0), _ = local_pods.pod_documents(spec, 0)
    assert pod0["metadata"]["name"] == "rehearse-0" and not set(map(str, local_pods.pod_documents(spec, 0)[1])) & set(mounts.values())


def test_local_gpu_pods_get_cdi_devices_of_their_own(config):
    from pipeline.kube import local_pods

    spec = _spec(config, gpus_per_node=2, name="rehearse")
    (_, pod), _ = local_pods.pod_documents(spec, 1)
    limits = _container(pod["spec"], "trainer")["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and {k for k in limits if k.startswith("nvidia.com/gpu=")} == {
        "nvidia.com/gpu=2", "nvidia.com/gpu=3"}


def test_local_mode_refuses_what_it_cannot_play(config):
    proc = run_py("launch/submit.py", "--config", str(config), "--nodes", "2", "--gpus-per-node", "0", "--image", IMAGE,
                  "--data-pvc", "d", "--local", "--format", "jobset")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    proc = run_py("launch/submit.py", "--config", str(config), "--nodes", "2", "--gpus-per-node", "0", "--image", IMAGE,
                  "--data-pvc", "d", "--local-volume", "d=/tmp")
    assert proc.returncode == 1 and "--local-volume only applies with --local" in proc.stderr, proc.stderr


# --- elastic jobs (--nodes MIN:MAX) -------------------------------------------------------

def test_an_elastic_job_can_lose_indexes_and_ends_when_index_0_succeeds(config):
    spec = _spec(config, nodes=3, min_nodes=1, gpus_per_node=0, rendezvous="c10d", max_restarts=3, restarts=2)
    job = _by_kind(render(spec))["Job"]
    elastic_versions = [v for v in VERSIONS if tuple(int(p) for p in v.split(".")[:2]) >= (1, 31)]
    for version in elastic_versions:  # successPolicy is beta from 1.31
        kv.validate(job, version, strict=True)
    js = job["spec"]
    assert js["completions"] == js["parallelism"] == 3 and "backoffLimit" not in js
    assert js["backoffLimitPerIndex"] == 2 and js["maxFailedIndexes"] == 2
    assert js["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    cmd = _container(js["template"]["spec"], "trainer")["command"]
    assert cmd[:2] == ["python", "launch/node.py"] and cmd[cmd.index("--min_machines") + 1] == "1"
    assert cmd[cmd.index("--num_machines") + 1] == "3" and cmd[cmd.index("--rdzv_backend") + 1] == "c10d"
    assert spec.world_sizes == [1, 2, 3]


def test_elastic_submissions_that_cannot_work_are_refused(config):
    with pytest.raises(UserError, match="needs --rendezvous c10d"):
        _spec(config, nodes=2, min_nodes=1, gpus_per_node=0)
    with pytest.raises(UserError, match="renders the plain Indexed Job"):
        _spec(config, nodes=2, min_nodes=1, gpus_per_node=0, rendezvous="c10d", max_restarts=1, fmt="jobset")
    with pytest.raises(ConfigError, match="on 3 process.*which this job can run with"):
        _spec(config, nodes=4, min_nodes=2, gpus_per_node=0, rendezvous="c10d", max_restarts=1,
              overrides=["train.batch_size=32", "train.global_batch_size=128"])
    proc = run_py("launch/submit.py", "--config", str(config), "--nodes", "1:2", "--gpus-per-node", "0", "--image", IMAGE,
                  "--data-pvc", "d", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["maxFailedIndexes"] == 1  # the CLI made it c10d with restarts by itself
    assert "--min_machines" in job["spec"]["template"]["spec"]["containers"][0]["command"]
    bad = run_py("launch/submit.py", "--config", str(config), "--nodes", "two", "--gpus-per-node", "0", "--image", IMAGE,
                 "--data-pvc", "d", "--dry-run")
    assert bad.returncode == 1 and "--nodes takes a number of pods or MIN:MAX" in bad.stderr


def test_submit_chooses_canonical_streams_every_process_count_divides(config):
    """Each rank reads its share at every size the job can run with: the least common multiple of the
    process counts (with a fixed global batch), unless the config says otherwise."""
    fixed = ["train.batch_size=32", "train.global_batch_size=192"]
    elastic = dict(nodes=3, min_nodes=1, gpus_per_node=0, rendezvous="c10d", max_restarts=1)
    spec = _spec(config, overrides=fixed, **elastic)
    assert spec.overrides[-1] == "data.canonical_streams=6"  # 1, 2 and 3 processes
    cmd = _container(_by_kind(render(spec))["Job"]["spec"]["template"]["spec"], "trainer")["command"]
    assert "data.canonical_streams=6" in cmd
    assert _spec(config).overrides[-1] == "data.canonical_streams=8"  # 2 nodes x 4 GPUs, global batch unset
    with pytest.raises(UserError, match=r"canonical_streams 4 is not a multiple of 3.*Use 6"):
        _spec(config, overrides=[*fixed, "data.canonical_streams=4"], **elastic)
    assert "data.canonical_streams=6" not in _spec(config, overrides=[*fixed, "data.canonical_streams=1"], **elastic).overrides
    # With the global batch unset (it grows with the processes) the count must divide every process count.
    grows = dict(nodes=2, min_nodes=1, gpus_per_node=2, rendezvous="c10d", max_restarts=1)  # 2 or 4 processes
    assert _spec(config, **grows).overrides[-1] == "data.canonical_streams=2"
    with pytest.raises(UserError, match=r"canonical_streams 4 is not a divisor of 2.*Use 2"):
        _spec(config, overrides=["data.canonical_streams=4"], **grows)
    config.write_text(config.read_text() + "# data.canonical_streams is chosen by submit.py\n")  # a comment is no choice
    assert _spec(config, overrides=fixed, **elastic).overrides[-1] == "data.canonical_streams=6"


# --- tuning jobs (launch/submit.py --tune) -------------------------------------------------

def _tune(config: Path, **kw) -> dict:
    from pipeline.kube.build import tune_spec

    storage = {k: kw.pop(k) for k in ("storage", "storage_secret", "storage_secret_key", "processes", "final_seeds",
                                      "refit") if k in kw}
    tune = tune_spec(ROOT / "configs" / "search" / "sequences.yaml", kw.pop("trials", 40), config, [], **storage)
    return _spec(config, tune=tune, **kw)


@pytest.mark.parametrize("variant", [{}, {"gpus_per_node": 0, "storage": "postgresql://u@db/tune"},
                                     {"storage_secret": "tune-db", "storage_secret_key": "dsn"},
                                     {"gpus_per_node": 4, "processes": 2, "final_seeds": "7", "refit": False}])
def test_a_tuning_job_is_tuner_pods_that_pass_strict_schema(config, variant):
    spec = _tune(config, **variant)
    docs = render(spec)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"], "tuners need no Service: the storage joins them"
    for doc in docs:
        _strict(doc)
    assert docs[0]["data"]["space.yaml"] == (ROOT / "configs" / "search" / "sequences.yaml").read_text()
    pod = docs[1]["spec"]["template"]["spec"]
    cmd = _container(pod, "trainer")["command"]
    assert cmd == pod_command(spec, pod_paths(spec)) and cmd[:2] == ["python", "launch/tune.py"]
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert flag["--space"] == "/etc/pipeline/space.yaml" and flag["--trials"] == "40"
    assert flag["--study"] == spec.name and flag["--dir"] == f"/outputs/{spec.name}"
    processes = variant.get("processes", 1)
    assert flag["--workers"] == str(max(1, spec.gpus_per_node) // processes) and flag["--processes"] == str(processes)
    assert flag["--index"] == "$(JOB_COMPLETION_INDEX)" and flag["--final-seeds"] == variant.get("final_seeds", "0,1,2")
    assert flag.get("--storage") == variant.get("storage")
    assert ("--no-refit" in cmd) == (variant.get("refit") is False)
    env = {e["name"]: e for e in _container(pod, "trainer")["env"]}
    if "storage_secret" in variant:  # the URL reaches launch/tune.py's --storage default, never the Job's spec
        ref = env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "tune-db", "key": "dsn"}
    else:
        assert "OPTUNA_STORAGE" not in env
    pre = _container(pod, "preflight", init=True)["command"]
    assert pre[pre.index("--rank") + 1] == "0", "a tuner waits for no master"


@pytest.mark.parametrize("kw, message", [
    ({"output_pvc": None}, "--tune needs --output-pvc"),
    ({"output_pvc": None, "storage": "postgresql://u@db/tune"}, "--tune needs --output-pvc"),
    ({"trials": 0}, "--trials must be at least 1"),
    ({"gpus_per_node": 4, "processes": 3}, "--trial-processes 3 must divide the 4"),
    ({"gpus_per_node": 0, "processes": 2}, "--trial-processes 2 must divide the 1"),
    ({"rendezvous": "c10d", "max_restarts": 1}, "--tune renders an Indexed Job"),
    ({"fmt": "jobset"}, "--tune renders an Indexed Job"),
    ({"storage": "postgresql://u:secret@db/tune"}, "--storage holds a password"),
    ({"storage": "postgresql://u@db/tune", "storage_secret": "db"}, "are alternatives"),
    ({"storage_secret": "Tune_DB"}, "storage secret"),
    ({"storage_secret": "db", "storage_secret_key": "a key"}, "--storage-secret-key"),
    ({"final_seeds": "0;1"}, "--final-seeds '0;1' must be seeds"),
    ({"gpus_per_node": 4, "processes": 4, "overrides": ["train.batch_size=16", "train.global_batch_size=32"]},
     r"global_batch_size 32 is not a whole number of micro-batches .* on 4 process\(es\) \(--trial-processes\)"),
    ({"final_seeds": "0,-1"}, "--final-seeds '0,-1' must be seeds"),
])
def test_a_bad_tuning_job_is_refused(config, kw, message):
    with pytest.raises(UserError, match=message):
        _tune(config, **kw)


def test_a_tuning_job_of_candidates_asks_for_no_more_trials_than_they_are(config):
    from pipeline.kube.build import tune_spec

    with pytest.raises(UserError, match="lists 3 candidates"):
        tune_spec(ROOT / "benchmarks" / "recipes" / "conv_models.yaml", 4, config, [])
    assert tune_spec(ROOT / "benchmarks" / "recipes" / "conv_models.yaml", 3, config, []).trials == 3


def test_submit_refuses_tuning_flags_without_tune_and_a_bad_space(config, tmp_path):
    base = ["launch/submit.py", "--config", str(config), "--nodes", "2", "--gpus-per-node", "0", "--image", IMAGE,
            "--data-pvc", "d", "--output-pvc", "o", "--dry-run"]
    proc = run_py(*base, "--trials", "4")
    assert proc.returncode != 0 and "--trials only applies with --tune" in proc.stderr
    proc = run_py(*base, "--no-refit")
    assert proc.returncode != 0 and "--no-refit only applies with --tune" in proc.stderr
    space = tmp_path / "space.yaml"
    space.write_text("optim.lrate: {type: float, low: 0.001, high: 0.01}\n")
    proc = run_py(*base, "--tune", "--space", str(space), "--trials", "4")
    assert proc.returncode == 2 and "optim.lrate" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_py(*base, "--tune", "--space", str(ROOT / "configs" / "search" / "sequences.yaml"), "--trials", "4",
                  "--no-refit")
    assert proc.returncode == 0 and "- --no-refit" in proc.stdout, proc.stderr[-2000:]
