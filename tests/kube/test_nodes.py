"""Nodes for real: the built image, the rendered job played as pods with their own network stacks,
and the ways a node is lost.

Every job here is `launch/submit.py --local`: the pods of the rendered Indexed Job, played by
podman on a network of their own, the master found by its Service name `<job>-0.<job>` through
podman's DNS, the outputs on a claim both pods mount. The image is built once per test session
(`make image`'s code, on the CPU stand-in base). Bounds are asserted loosely (a shared CI machine);
the figures measured are printed.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from containers import DIRTY, Job, podman, require_podman, unique
from safetensors.torch import load_file

from pipeline.distributed.peers import PEER_LOST_EXIT_CODE
from pipeline.kube import local
from pipeline.kube.build import build_spec
from pipeline.kube.render import TRAINER_BUG_CODES

pytestmark = [pytest.mark.slow, pytest.mark.containers]

# Long enough to be hit mid-run at step ~100, short enough to finish in CI; checkpoints every 25
# steps so that the resubmission has one to resume from.
RUN = ["train.max_steps=300", "eval.every_steps=100", "checkpoint.every_steps=25", "train.log_every_steps=5"]
DEAD_PEER_BOUND_S = 20  # aim: 10
SILENT_PEER_BOUND_S = 75  # aim: 60 (train.peer_timeout_s defaults to 30)


@pytest.fixture(scope="module")
def image() -> str:
    require_podman()
    from pipeline.kube.image import build_image

    return build_image(base="cpu", quiet=True)


@pytest.fixture
def job(image, fashion_shards, tmp_path):
    made: list[Job] = []

    def make(overrides: list[str] = RUN, extra: list[str] | None = None, name: str | None = None) -> Job:
        j = Job(name or unique("nodes"), image, fashion_shards, tmp_path / "claim", list(overrides), list(extra or []))
        made.append(j)
        return j

    yield make
    for j in made:
        j.forget()


@pytest.fixture(scope="module")
def uninterrupted(image, fashion_shards, tmp_path_factory):
    """The reference: the job of RUN, straight through."""
    j = Job(unique("straight"), image, fashion_shards, tmp_path_factory.mktemp("straight") / "claim", list(RUN))
    try:
        j.submit()
        codes = j.wait(600)
        yield j, codes, j.logs(), j.env(0)
    finally:
        j.forget()


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model" / "model.safetensors")


def test_the_image_trains_as_uid_10001_on_a_read_only_root_filesystem(image, fashion_shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    proc = podman("run", "--rm", "--user", "10001", "--read-only", "-v", f"{fashion_shards}:/data:ro",
                  "-v", f"{out}:/outputs", image, "python", "launch/train.py", "--config", "configs/cpu_test.yaml",
                  "data.dir=/data", "output_dir=/outputs/run", "train.progress_bar=false", check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 300 and summary["final_eval_accuracy"] >= 0.75
    assert {p.lstat().st_uid for p in (out / "run").rglob("*")} == {10001}
    assert list((out / "run" / "wandb").glob("offline-run-*/run-*.wandb")), "the W&B run was written under a read-only root"
    # The root filesystem really was read-only, and the image's user is the numeric 10001 the pods ask for.
    probe = podman("run", "--rm", "--read-only", image, "python", "-c", "open('/app/probe', 'w')", check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    assert podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip() == "10001"


def test_a_two_pod_job_forms_one_world_over_dns_and_leaves_clean_logs(uninterrupted):
    j, codes, logs, env = uninterrupted
    assert codes == {0: 0, 1: 0}, logs
    summary = json.loads((j.output_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU" and summary["completed"]
    assert env["MASTER_ADDR"] == f"{j.name}-0.{j.name}"  # the headless Service's name, resolved by DNS
    assert env["JOB_COMPLETION_INDEX"] == "0"
    assert "preflight: master" in j.log(1, "preflight")  # rank 1 waited for the master by name
    assert not DIRTY.search(logs), logs


def test_the_master_pod_starting_last_is_waited_for(job):
    j = job(["train.max_steps=20", "eval.every_steps=10", "checkpoint.every_steps=10"])
    spec = build_spec("configs/cpu_test.yaml", "job", name=j.name, image=j.image, nodes=2, gpus_per_node=0,
                      data_pvc=f"{j.name}-data", output_pvc=f"{j.name}-out", overrides=j.overrides)
    local.check_local(spec, "job")
    local.prepare(spec, {f"{j.name}-data": str(j.shards), f"{j.name}-out": str(j.out)})
    late: list[BaseException] = []

    def play_second() -> None:
        try:
            local.wait_played(spec, 1, local.play_pod(spec, 1))
        except BaseException as err:  # reported by the main thread
            late.append(err)

    second = threading.Thread(target=play_second)
    second.start()
    time.sleep(8)  # pod 1 is up and its init container waits: no pod 0, so no DNS name and no port
    assert second.is_alive() and "preflight: master" not in j.log(1, "preflight")
    local.wait_played(spec, 0, local.play_pod(spec, 0))
    second.join(timeout=300)
    assert not late, late
    assert j.wait(300) == {0: 0, 1: 0}, j.logs()
    assert json.loads((j.output_dir / "summary.json").read_text())["world_size"] == 2


def _ended_within(j: Job, index: int, since: float, timeout: float) -> tuple[int, float]:
    code = j.wait(timeout, (index,))[index]
    return code, time.monotonic() - since


def test_a_killed_pod_ends_the_other_at_once_and_the_resubmitted_job_finishes_bit_identically(job, uninterrupted):
    j = job()
    j.submit()
    j.wait_for_step(100)
    killed = time.monotonic()
    j.kill_pod(1)
    code, took = _ended_within(j, 0, killed, 120)
    log = j.log(0)
    # The bound is on the survivor's reaction: from its peer's exit to its own, both by podman's
    # clock (under load the podman commands around them take seconds of their own).
    reaction = j.finished_at(0) - j.finished_at(1)
    print(f"surviving pod ended {reaction:.1f} s after its peer's trainer did ({took:.1f} s after the kill began)")
    assert code == PEER_LOST_EXIT_CODE and code not in TRAINER_BUG_CODES, log
    assert 0 <= reaction < DEAD_PEER_BOUND_S, log
    assert f"lost peer: rank 1 (host {j.name}-1," in log and "stopped at step" in log, log
    assert f"the newest checkpoint is /outputs/{j.name}/checkpoints/step-" in log, log
    assert "Traceback" not in log, log

    j.delete()
    j.submit()  # the same job again: same name, same claim
    assert j.wait(600) == {0: 0, 1: 0}, j.logs()
    assert "resumed from" in j.log(0)
    summary = json.loads((j.output_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["completed"] and summary["world_size"] == 2
    reference, resumed = _weights(uninterrupted[0].output_dir), _weights(j.output_dir)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), "weights differ from the uninterrupted job's"


def test_a_cut_link_ends_both_pods_within_the_bound_naming_the_lost_side(job):
    j = job()
    j.submit()
    j.wait_for_step(100)
    cut = time.monotonic()
    j.cut_link(1)
    codes, took = {}, {}
    for index in (0, 1):
        codes[index], took[index] = _ended_within(j, index, cut, 240)
    print(f"after the cut: pod 0 ended in {took[0]:.1f} s, pod 1 in {took[1]:.1f} s")
    master, cut_off = j.log(0), j.log(1)
    assert codes == {0: PEER_LOST_EXIT_CODE, 1: PEER_LOST_EXIT_CODE}, j.logs()
    assert max(took.values()) < SILENT_PEER_BOUND_S, j.logs()
    assert f"lost peer: rank 1 (host {j.name}-1," in master and "has sent no heartbeat" in master, master
    assert f"the rendezvous store at {j.name}-0.{j.name}:29500" in cut_off and "network is cut" in cut_off, cut_off
    assert "Traceback" not in master + cut_off


def test_a_config_error_in_a_pod_exits_2_which_fails_the_job_at_once(job):
    # The trainer container, not the preflight: what the podFailurePolicy sees from launch/node.py.
    j = job(["train.max_steps=20", "eval.every_steps=10"])
    spec = build_spec("configs/cpu_test.yaml", "job", name=j.name, image=j.image, nodes=1, gpus_per_node=0,
                      data_pvc=f"{j.name}-data", output_pvc=f"{j.name}-out", overrides=j.overrides)
    docs, _ = local.pod_documents(spec, 0)
    command = docs[1]["spec"]["containers"][0]["command"]
    proc = podman("run", "--rm", "--user", "10001", "--read-only", "-v", f"{j.shards}:/data:ro", j.image,
                  *command[:command.index("launch/train.py")], "launch/train.py", "--config", "configs/cpu_test.yaml",
                  "data.dir=/data", "output_dir=/tmp/out", "train.batch_size=0", check=False)
    assert proc.returncode == 2 and proc.returncode in TRAINER_BUG_CODES, proc.stderr[-3000:]
    assert "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_tuning_job_played_as_pods_finishes_one_study_between_them(job, tmp_path):
    """submit.py --tune --local: two tuner pods of the image share the study's journal on the output claim;
    every trial runs once, in one of them, and pod 0 alone writes the report and trains the winner."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    j = job(["train.max_steps=30", "eval.every_steps=15", "checkpoint.every_steps=15"],
            extra=["--tune", "--space", str(space), "--trials", "3", "--final-seeds", "0"])
    j.submit()
    assert j.wait(600) == {0: 0, 1: 0}, j.logs()
    with open(j.output_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "complete"), ("1", "complete"), ("2", "complete")]
    ran = [re.findall(r"\[tune\] trial (\d+): optim", j.log(i)) for i in (0, 1)]
    assert sorted(ran[0] + ran[1]) == ["0", "1", "2"] and all(ran), ran
    assert "tuner 0 writes the report" in j.log(1) and "trained with seeds" not in j.log(1)
    final = json.loads((j.output_dir / "final.json").read_text())
    assert final["complete"] and list(final["seeds"]) == ["0"] and final["test_mean"] > 0.3
    assert (j.output_dir / "best.yaml").is_file() and not DIRTY.search(j.log(0) + j.log(1)), j.logs()


def test_pods_have_their_own_network_stacks_and_filesystems(job):
    j = job(["train.max_steps=600", "eval.every_steps=300", "checkpoint.every_steps=300"])
    j.submit()
    j.wait_for_step(10)
    states = {s.rank: s for s in j.states()}
    assert states[0].address and states[1].address and states[0].address != states[1].address
    hosts = [podman("exec", f"{j.name}-{i}-trainer", "python", "-c",
                    "import socket, os; open('/tmp/mine', 'w').write(socket.gethostname()); print(socket.gethostname(), "
                    "sorted(os.listdir('/tmp')))").stdout.strip() for i in (0, 1)]
    assert hosts[0].startswith(f"{j.name}-0 ") and hosts[1].startswith(f"{j.name}-1 ")
    mine = [podman("exec", f"{j.name}-{i}-trainer", "cat", "/tmp/mine").stdout for i in (0, 1)]
    assert mine == [f"{j.name}-0", f"{j.name}-1"]  # each pod's /tmp is its own


def test_an_elastic_job_that_loses_a_pod_for_good_finishes_on_the_other_bit_identically(job, uninterrupted):
    from wandb_records import find_logs, parse_finished

    j = job(extra=["--nodes", "1:2"])  # the last --nodes wins: MIN:MAX, c10d, restarts
    j.submit()
    j.wait_for_step(100)
    j.kill_pod(1)  # and nothing replaces it
    assert j.wait(600, (0,)) == {0: 0}, j.logs()
    log = j.log(0)
    assert "lost peer: rank 1" in log and "world size 2 -> 1: the same global batch of 256" in log, log
    assert "Traceback" not in log
    summary = json.loads((j.output_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["completed"] and summary["resumed"]
    assert summary["samples_seen"] == 300 * 256 and summary["accumulation_steps"] == 2
    rows = [json.loads(line) for line in (j.output_dir / "metrics.jsonl").read_text().splitlines()]
    (change,) = [r for r in rows if "world/size" in r]
    assert (change["world/previous_size"], change["world/size"]) == (2, 1) and change["step"] % 25 == 0
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 300, "samples_seen never goes back"
    # One W&B run across both world sizes, with the change in its history.
    runs = [parse_finished(p) for p in find_logs(j.output_dir / "wandb")]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1
    assert runs[1].column("world/size") == [(change["step"], 1)]
    # 2 ranks x 1 micro-batch and 1 rank x 2 accumulate the same sums: the uninterrupted job's weights.
    reference, finished = _weights(uninterrupted[0].output_dir), _weights(j.output_dir)
    assert all(torch.equal(reference[k], finished[k]) for k in reference)
