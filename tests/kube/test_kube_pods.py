"""The rendered pods, run as local processes: one real multi-node job on CPU.

Each "pod" gets the rendered container env (Secret references dropped), its own
JOB_COMPLETION_INDEX, and the master name pointed at 127.0.0.1 on a free port. Its command
lines come from the same functions that filled the manifest (checked below), with local
paths for the config, data and outputs, and $(VAR) expanded as the kubelet would. Pod 1 runs
the init container's preflight first, so it also waits on the master's port as in a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, free_port
from processes import train_ranks, wait_for_step

from pipeline.distributed.elastic import FRESH_STORE_VAR
from pipeline.distributed.peers import PEER_LOST_EXIT_CODE
from pipeline.kube import (
    PodPaths,
    build_spec,
    expand_env_refs,
    pod_command,
    pod_paths,
    preflight_command,
    render,
)
from pipeline.kube.render import TRAINER_BUG_CODES
from pipeline.kube.spec import JobSpec

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "cpu_test.yaml"
NODES = 2


class Pod:
    """One simulated pod: the rendered env + a rank, running rendered command lines."""

    def __init__(self, spec: JobSpec, index: int, paths: PodPaths, port: int, logdir: Path):
        job = next(d for d in render(spec) if d["kind"] == "Job")
        pod = job["spec"]["template"]["spec"]
        trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
        # The manifest's command lines are exactly what the functions below build for pod paths.
        assert trainer["command"] == pod_command(spec, pod_paths(spec))
        assert pod["initContainers"][0]["command"] == preflight_command(spec, pod_paths(spec))
        env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
        env.update(JOB_COMPLETION_INDEX=str(index), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WANDB_DIR=paths.output_dir)
        self.env = env
        self.paths = paths
        self.spec = spec
        self.index = index
        self.log = logdir / f"pod-{index}.log"
        self.proc: subprocess.Popen | None = None

    def _cmd(self, argv: list[str]) -> list[str]:
        return expand_env_refs(argv, self.env)

    def _process_env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)  # `accelerate` and `python` of this venv, as on the image's PATH
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        # CUDA_VISIBLE_DEVICES empty: these pods are rendered with gpus_per_node=0, so they see no GPU
        # even when the machine running the test has one.
        return {**base, **self.env, "PATH": f"{bindir}{os.pathsep}{base.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": ""}

    def start(self, argv: list[str]) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self._cmd(argv), cwd=ROOT, env=self._process_env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        return self.proc

    def preflight(self) -> subprocess.Popen:
        return self.start(preflight_command(self.spec, self.paths))

    def train(self) -> subprocess.Popen:
        return self.start(pod_command(self.spec, self.paths))

    def kill(self) -> None:
        """What deleting a pod does: every process in it dies at once.

        torchrun starts its workers in their own sessions, so a process-group kill would leave
        them running; collect the whole tree first, as the container's PID namespace would.
        """
        if self.proc is None:
            return
        try:
            tree = [self.proc, *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = [self.proc]
        for proc in tree:
            try:
                proc.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _job(tmp_path: Path, shards: Path, overrides: list[str], **options) -> tuple[JobSpec, PodPaths]:
    spec = build_spec(CONFIG, "job", name="sim", image="local/lstm-pipeline:test", nodes=NODES, gpus_per_node=0,
                      data_pvc="data", output_pvc="outputs", overrides=overrides, **options)
    paths = PodPaths(config_file=str(CONFIG), data_dir=str(shards), output_dir=str(tmp_path / "outputs" / spec.name))
    return spec, paths


def _wait(proc: subprocess.Popen, timeout: float, pods: list[Pod]) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logs = "\n".join(f"--- pod {p.index}\n{p.output()[-4000:]}" for p in pods)
        raise AssertionError(f"pod process did not exit within {timeout:.0f} s\n{logs}") from None


def _start_pods(spec: JobSpec, paths: PodPaths, tmp_path: Path) -> list[Pod]:
    port = free_port()
    pods = [Pod(spec, i, paths, port, tmp_path) for i in range(NODES)]
    # Pod 1's init container starts first and must wait for the master rather than fail.
    waiting = pods[1].preflight()
    assert _wait(pods[0].preflight(), 60, pods) == 0, pods[0].output()
    time.sleep(1.0)
    assert waiting.poll() is None, f"rank 1's preflight did not wait for the master:\n{pods[1].output()}"
    pods[0].train()
    assert _wait(waiting, 120, pods) == 0, pods[1].output()
    pods[1].train()
    return pods


@pytest.fixture
def pods_cleanup():
    started: list[Pod] = []
    yield started
    for pod in started:
        pod.kill()


@pytest.mark.parametrize("rendezvous", [{"rendezvous": "static"}, {"rendezvous": "c10d", "max_restarts": 1}],
                         ids=["static", "c10d"])
def test_two_pods_form_one_job_and_finish_a_short_run(fashion_shards, tmp_path, pods_cleanup, rendezvous):
    spec, paths = _job(tmp_path, fashion_shards, [
        "train.max_steps=20", "eval.every_steps=10", "checkpoint.every_steps=10", "wandb.mode=disabled"], **rendezvous)
    pods = _start_pods(spec, paths, tmp_path)
    pods_cleanup.extend(pods)
    codes = [_wait(p.proc, 600, pods) for p in pods]
    assert codes == [0, 0], "\n".join(f"--- pod {p.index}\n{p.output()[-4000:]}" for p in pods)
    for pod in pods:  # the launchers' exit barrier included: the master's node leaves last
        assert "Traceback" not in pod.output() and "exit barrier" not in pod.output(), pod.output()
    summary = json.loads((Path(paths.output_dir) / "summary.json").read_text())
    assert summary["world_size"] == NODES  # one job across both pods, not two world-size-1 runs
    assert summary["distributed_type"] == "MULTI_CPU"
    assert summary["steps"] == 20


def test_killing_one_pod_fails_the_other_instead_of_hanging(fashion_shards, tmp_path, pods_cleanup):
    # Long enough that nothing finishes by itself while we watch.
    spec, paths = _job(tmp_path, fashion_shards, [
        "train.max_steps=100000", "eval.every_steps=50000", "checkpoint.every_steps=50000", "wandb.mode=disabled"])
    pods = _start_pods(spec, paths, tmp_path)
    pods_cleanup.extend(pods)
    deadline = time.monotonic() + 240
    while "world size 2" not in pods[0].output():  # rank 0's first log line: the process group exists
        assert time.monotonic() < deadline and pods[0].proc.poll() is None, pods[0].output()[-4000:]
        time.sleep(0.5)
    time.sleep(5)  # well into the training loop and its all-reduces
    assert pods[0].proc.poll() is None and pods[1].proc.poll() is None
    pods[1].kill()
    start = time.monotonic()
    code = _wait(pods[0].proc, 120, pods)
    # The lost-peer code, not a fail-fast one: the Job would replace the pods and resume.
    assert code == PEER_LOST_EXIT_CODE and code not in TRAINER_BUG_CODES, pods[0].output()[-4000:]
    assert "lost peer: rank 1 (host " in pods[0].output() and "Traceback" not in pods[0].output(), pods[0].output()
    print(f"surviving pod exited {code} {time.monotonic() - start:.1f} s after its peer was killed")


def test_a_crashed_trainer_restarts_both_pods_which_resume_and_finish(fashion_shards, tmp_path, pods_cleanup):
    # Two elastic agents count restarts independently; the rendered env makes each round's store fresh.
    spec, paths = _job(tmp_path, fashion_shards, [
        "train.max_steps=600", "eval.every_steps=300", "checkpoint.every_steps=20", "train.log_every_steps=1",
        "wandb.mode=disabled"], rendezvous="c10d", max_restarts=1)
    pods = _start_pods(spec, paths, tmp_path)
    pods_cleanup.extend(pods)
    assert pods[1].env[FRESH_STORE_VAR] == "1"
    out = Path(paths.output_dir)
    wait_for_step(out, 30, pods[0].proc, timeout=240)
    os.kill(train_ranks(pods[1].proc.pid, 1)[0], signal.SIGKILL)  # the trainer dies, its pod lives on
    codes = [_wait(p.proc, 300, pods) for p in pods]
    assert codes == [0, 0], "\n".join(f"--- pod {p.index}\n{p.output()[-4000:]}" for p in pods)
    assert "resumed from" in pods[0].output()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["completed"] and summary["steps"] == 600 and summary["world_size"] == NODES
