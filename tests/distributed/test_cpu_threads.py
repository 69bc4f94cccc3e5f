"""Threads from the CPUs a process may use, and OpenMP waiting that survives busy neighbours.

The thread count is computed from fake /proc and cgroup files (v2, v1, the hybrid of this CI
machine, a pod's limit above its container's); then for real: a process pinned to one CPU, the
trainer saying what it chose and why, and (containers) the image under podman --cpus 1 and 2.
No wall-clock bound is asserted here: benchmarks/cpu_threads.py measures the speed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_py

from pipeline.distributed import cpu_threads
from pipeline.distributed.cpu_threads import (
    SPINCOUNT,
    SPINCOUNT_VAR,
    THREADS_VAR,
    WAIT_POLICY_VAR,
    CgroupQuota,
    cgroup_quota,
    configure,
    decide,
)
from pipeline.distributed.launch_env import LaunchEnv

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID_MOUNTS = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
                 "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
                 "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
                 "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")


def _fs(tmp_path: Path, mountinfo: str, cgroup: str, files: dict[str, str]) -> Path:
    """A fake root: /proc/self/{mountinfo,cgroup} and the cgroup files given (path -> text)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        path = tmp_path / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_v2_quota_of_the_process_cgroup(tmp_path):
    root = _fs(tmp_path, V2_MOUNT, "0::/kubepods/pod1/ctr\n", {"/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "150000 100000\n"})
    assert cgroup_quota(root) == CgroupQuota(1.5, "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max")


def test_v2_without_a_limit_is_no_quota(tmp_path):
    root = _fs(tmp_path, V2_MOUNT, "0::/user.slice\n", {"/sys/fs/cgroup/user.slice/cpu.max": "max 100000\n"})
    assert cgroup_quota(root) is None


def test_a_limit_on_a_parent_binds_the_child(tmp_path):
    """A pod's limit sits on the pod's cgroup, above its containers' (which may have none)."""
    root = _fs(tmp_path, V2_MOUNT, "0::/kubepods/pod1/ctr\n", {
        "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000\n",
        "/sys/fs/cgroup/kubepods/cpu.max": "800000 100000\n",
    })
    assert cgroup_quota(root) == CgroupQuota(2.0, "/sys/fs/cgroup/kubepods/pod1/cpu.max")


def test_v1_cfs_quota_on_a_hybrid_machine(tmp_path):
    """This CI machine's layout: v1 controllers, an empty v2 hierarchy at /sys/fs/cgroup/unified."""
    cgroup = "9:name=systemd:/\n3:cpuset:/\n2:cpu,cpuacct:/machine.slice/libpod-abc.scope\n0::/\n"
    root = _fs(tmp_path, HYBRID_MOUNTS, cgroup, {
        "/sys/fs/cgroup/cpu,cpuacct/machine.slice/libpod-abc.scope/cpu.cfs_quota_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/machine.slice/libpod-abc.scope/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_quota(root) == CgroupQuota(1.0, "/sys/fs/cgroup/cpu,cpuacct/machine.slice/libpod-abc.scope/cpu.cfs_quota_us")


def test_v1_inside_a_container_whose_mount_shows_its_own_cgroup_as_root(tmp_path):
    """runc on v1 without a cgroup namespace: /proc/self/cgroup names the host path, the mount's root is it."""
    mounts = "500 490 0:29 /machine.slice/libpod-abc.scope /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu\n"
    root = _fs(tmp_path, mounts, "1:cpu:/machine.slice/libpod-abc.scope\n", {
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "200000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(root) == CgroupQuota(2.0, "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")


def test_no_cgroup_files_is_no_quota(tmp_path):
    assert cgroup_quota(tmp_path) is None


@pytest.mark.parametrize(("affinity", "quota", "processes", "threads"), [
    (64, None, 1, 64),
    (64, 1.0, 1, 1),  # a pod limited to 1 CPU on a 64-core node: 1 thread, not 64
    (64, 1.5, 1, 1),  # a fractional quota rounds down: 2 threads would be throttled mid-barrier
    (64, 0.5, 1, 1),
    (2, 8.0, 1, 2),  # the affinity mask binds tighter than the quota
    (8, None, 2, 4),  # the CPUs shared among the processes of the node
    (2, None, 4, 1),
])
def test_threads_are_the_usable_cpus_divided_among_the_node_processes(affinity, quota, processes, threads):
    q = CgroupQuota(quota, "/sys/fs/cgroup/cpu.max") if quota is not None else None
    choice = decide({}, processes, affinity, q)
    assert choice.threads == threads
    assert f"affinity mask {affinity}" in choice.source and f"/ {processes} process(es)" in choice.source
    assert ("cpu.max" in choice.source) == (quota is not None)


def test_the_user_s_count_wins_config_first_then_omp_num_threads():
    assert decide({THREADS_VAR: "3"}, 1, 64, None).threads == 3
    assert "OMP_NUM_THREADS=3" in decide({THREADS_VAR: "3"}, 1, 64, None).source
    chosen = decide({THREADS_VAR: "3"}, 1, 64, None, configured=5)
    assert chosen.threads == 5 and "train.cpu_threads" in chosen.source
    # 0 (--num_cpu_threads_per_process 0) and junk ask for the computed count, as unset does.
    assert decide({THREADS_VAR: "0"}, 1, 8, CgroupQuota(2.0, "q")).threads == 2
    assert decide({THREADS_VAR: "many"}, 1, 8, None).threads == 8


def _free(got: float, asked: list[int] | None = None):
    def free(threads: int) -> float:
        if asked is not None:
            asked.append(threads)
        return min(got, threads)
    return free


def test_cpus_held_by_other_processes_mean_threads_that_sleep_at_once():
    idle = decide({}, 1, 2, None, free=_free(2.0))
    assert (idle.threads, idle.waiting_env) == (2, {SPINCOUNT_VAR: SPINCOUNT})
    one_busy = decide({}, 1, 2, None, free=_free(1.3))  # 2 probe threads beside 1 busy process: 2/3 of a CPU each
    assert (one_busy.threads, one_busy.waiting_env) == (2, {WAIT_POLICY_VAR: "PASSIVE"})
    assert "2 busy threads got 1.3 CPUs" in one_busy.waiting
    # The count never follows the load: it changes the float sums, the waiting only the speed.
    assert decide({}, 1, 8, None, free=_free(3.0)).threads == 8
    assert decide({}, 1, 8, None, free=_free(7.5)).waiting_env == {SPINCOUNT_VAR: SPINCOUNT}  # within SHARED_BELOW


def test_the_probe_runs_only_where_the_waiting_is_left_to_decide():
    asked: list[int] = []
    both = decide({THREADS_VAR: "2", WAIT_POLICY_VAR: "PASSIVE"}, 1, 2, None, free=_free(0.5, asked))
    assert asked == [] and both.threads == 2 and both.waiting_env == {}
    # One thread waits for no other: the waiting makes no difference, and is not measured.
    assert decide({}, 2, 2, None, free=_free(0.5, asked)).waiting_env == {SPINCOUNT_VAR: SPINCOUNT} and asked == []
    # The user's count stays; its waiting is chosen for the CPUs as they are.
    mine = decide({THREADS_VAR: "2"}, 1, 2, None, free=_free(1.0, asked))
    assert asked == [2] and (mine.threads, mine.waiting_env) == (2, {WAIT_POLICY_VAR: "PASSIVE"})


def test_measure_free_counts_what_busy_threads_get():
    got = cpu_threads.measure_free(1, seconds=0.05)
    assert 0.0 < got <= 1.1


def test_waiting_spins_briefly_unless_the_user_chose(tmp_path):
    environ: dict[str, str] = {}
    configure(LaunchEnv(), environ=environ, root=tmp_path, say=lambda line: None, free=float)
    assert environ[SPINCOUNT_VAR] == SPINCOUNT and WAIT_POLICY_VAR not in environ
    for chosen in ({WAIT_POLICY_VAR: "ACTIVE"}, {SPINCOUNT_VAR: "0"}):
        environ = dict(chosen)
        choice = configure(LaunchEnv(), environ=environ, root=tmp_path, say=lambda line: None, free=float)
        assert environ == {**chosen, THREADS_VAR: str(choice.threads)} and "as set" in choice.waiting


def test_configure_exports_the_count_and_says_it_once_per_node(tmp_path):
    said: list[str] = []
    environ = {THREADS_VAR: "0"}
    choice = configure(LaunchEnv(rank=2, local_rank=0, local_world_size=2, world_size=4), environ=environ, root=tmp_path,
                       say=said.append, free=float)
    assert environ[THREADS_VAR] == str(choice.threads) and said == [f"[threads] {choice.describe()}"]
    configure(LaunchEnv(rank=3, local_rank=1, local_world_size=2, world_size=4), environ={}, root=tmp_path,
              say=said.append, free=float)
    assert len(said) == 1


def test_the_image_and_the_makefile_leave_the_choice_to_each_process():
    """Baked into the image, a value would hold for every container whatever its CPUs (and turn the
    waiting into "set by the user"); make train asks accelerate for the computed count."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(rf"^[^#]*\b({THREADS_VAR}|{WAIT_POLICY_VAR}|{SPINCOUNT_VAR})=", dockerfile, re.MULTILINE)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^THREADS \?= {cpu_threads.AUTO_THREADS}$", makefile, re.MULTILINE)
    assert "--num_cpu_threads_per_process $(THREADS)" in makefile


def test_rendered_pods_limit_cpus_and_let_each_rank_count_its_threads():
    from pipeline.kube import build_spec, render

    for gpus, cpu in ((0, None), (2, "6")):
        spec = build_spec(ROOT / "configs" / "cpu_test.yaml", "job", name="t", image="i:1", nodes=2, gpus_per_node=gpus,
                          data_pvc="d", cpu=cpu, overrides=["train.batch_size=64"])
        pod = next(d for d in render(spec) if d["kind"] == "Job")["spec"]["template"]["spec"]
        trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
        res, cmd = trainer["resources"], trainer["command"]
        assert res["limits"]["cpu"] == res["requests"]["cpu"] == (cpu or "1")
        assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == cpu_threads.AUTO_THREADS


def _pinned_to_one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


PROBE = ("from pipeline.distributed.cpu_threads import configure; from pipeline.distributed.launch_env import LaunchEnv; "
         "configure(LaunchEnv.from_environ()); import torch; print('torch threads', torch.get_num_threads())")


def test_a_process_pinned_to_one_cpu_computes_with_one_thread():
    env = {k: v for k, v in os.environ.items() if k not in (THREADS_VAR, SPINCOUNT_VAR, WAIT_POLICY_VAR)}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_pinned_to_one_cpu)
    assert proc.returncode == 0, proc.stderr
    assert "torch threads 1" in proc.stdout
    assert "[threads] 1 CPU thread(s) per process: 1 usable CPU(s) (affinity mask 1" in proc.stdout


def test_torch_loads_gnu_libgomp_which_reads_gomp_spincount():
    """The waiting knob is libgomp's: if a torch build brought another OpenMP runtime, it would do nothing."""
    code = PROBE + "; print([l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l.split()[-1]][:1])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "libgomp" in proc.stdout, proc.stdout + proc.stderr


SHORT = ["train.max_steps=20", "eval.every_steps=20", "checkpoint.every_steps=20", "wandb.mode=disabled",
         "train.progress_bar=false"]


@pytest.mark.slow
def test_the_trainer_says_its_threads_and_where_they_came_from(fashion_shards, tmp_path):
    env = {THREADS_VAR: "", "WANDB_MODE": "disabled"}
    base = ["launch/train.py", "--config", "configs/cpu_test.yaml", f"data.dir={fashion_shards}", *SHORT]
    auto = run_py(*base, f"output_dir={tmp_path / 'auto'}", env=env, check=True)
    cpus = len(os.sched_getaffinity(0))
    # All the CPUs, or fewer where other processes (a CI machine's other tests) hold some right now.
    counted = re.compile(rf"\[threads\] (\d+) CPU thread\(s\) per process: (\d+) usable CPU\(s\) \(affinity mask {cpus}, "
                         rf".*\) / 1 process\(es\) on this node.*({SPINCOUNT_VAR}=\d+|{WAIT_POLICY_VAR}=PASSIVE)")
    match = counted.search(auto.stdout)
    assert match and 1 <= int(match.group(1)) <= int(match.group(2)) <= cpus, auto.stdout[-3000:]
    assert auto.stdout.count("[threads]") == 1 and "[threads]" not in auto.stderr
    forced = run_py(*base, f"output_dir={tmp_path / 'forced'}", "train.cpu_threads=1", env=env, check=True)
    assert "[threads] 1 CPU thread(s) per process: train.cpu_threads in the config" in forced.stdout
    # As make train runs it: accelerate launch with --num_cpu_threads_per_process 0 counts the CPUs ...
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process"]
    made = subprocess.run([*accelerate, "0", *base, f"output_dir={tmp_path / 'make'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert made.returncode == 0 and counted.search(made.stdout), made.stderr[-3000:]
    # ... and a number given to accelerate is the user's.
    given = subprocess.run([*accelerate, "1", *base, f"output_dir={tmp_path / 'given'}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert given.returncode == 0 and "[threads] 1 CPU thread(s) per process: OMP_NUM_THREADS=1" in given.stdout, \
        given.stderr[-3000:]


@pytest.fixture(scope="module")
def image() -> str:
    from containers import require_podman

    require_podman()
    from pipeline.kube.image import build_image

    return build_image(base="cpu", quiet=True)


@pytest.mark.slow
@pytest.mark.containers
@pytest.mark.parametrize("cpus", [1, 2])
def test_the_image_under_a_cpu_limit_starts_that_many_threads(image, fashion_shards, tmp_path, cpus):
    from containers import podman

    if cpus > len(os.sched_getaffinity(0)):
        pytest.skip(f"this machine has fewer than {cpus} CPUs")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    proc = podman("run", "--rm", "--cpus", str(cpus), "--read-only", "-v", f"{fashion_shards}:/data:ro",
                  "-v", f"{out}:/outputs", image, "python", "launch/train.py", "--config", "configs/cpu_test.yaml",
                  "data.dir=/data", "output_dir=/outputs/run", *SHORT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("[threads]")), proc.stdout[-3000:])
    assert line.startswith(f"[threads] {cpus} CPU thread(s) per process:") and f"cgroup quota {cpus} CPUs" in line, line
    probe = podman("run", "--rm", "--cpus", str(cpus), "--read-only", image, "python", "-c", PROBE, check=False)
    assert probe.returncode == 0 and f"torch threads {cpus}" in probe.stdout, probe.stdout + probe.stderr
