"""One run per output_dir: the lease, with real files and real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import read_jsonl, train_args, train_run
from processes import start_session, wait_for_step

from pipeline.distributed.launch_env import LaunchEnv
from pipeline.distributed.lease import LEASE_NAME, OutputDirBusy, OutputLease


def _plant(directory, *, host=None, pid=None, job_id=None, age_s=0.0, token="theirs"):
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid or os.getpid(), "job_id": job_id,
              "started": "2026-01-01T00:00:00Z", "heartbeat": time.time() - age_s, "token": token}
    (directory / LEASE_NAME).write_text(json.dumps(holder))


def _holder(directory):
    return json.loads((directory / LEASE_NAME).read_text())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_free_directory_is_taken_and_given_back(tmp_path):
    lease = OutputLease(tmp_path / "out", timeout_s=60)
    assert lease.acquire() is None
    assert _holder(tmp_path / "out")["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / "out" / LEASE_NAME).exists()


def test_live_holder_on_this_host_is_refused_with_its_identity(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path, pid=sleeper.pid, age_s=1)
        with pytest.raises(OutputDirBusy) as err:
            OutputLease(tmp_path, timeout_s=60).acquire()
        assert f"pid {sleeper.pid} on host {socket.gethostname()}" in str(err.value)
        assert "since 2026-01-01T00:00:00Z" in str(err.value) and "choose another output_dir" in str(err.value)
        assert _holder(tmp_path)["token"] == "theirs", "a refused run changes nothing"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_other_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    _plant(tmp_path, host="node-7", pid=1, age_s=5)
    with pytest.raises(OutputDirBusy, match="pid 1 on host node-7"):
        OutputLease(tmp_path, timeout_s=60).acquire()


@pytest.mark.parametrize("planted,reason", [
    (dict(pid=None, age_s=1), "its process is gone"),  # pid filled in with a dead one below
    (dict(host="node-7", pid=1, age_s=120), "no heartbeat for over 60 s"),
])
def test_stale_lease_is_taken_over_with_a_warning(tmp_path, planted, reason):
    _plant(tmp_path, **{**planted, "pid": planted["pid"] or _dead_pid()})
    lease = OutputLease(tmp_path, timeout_s=60)
    warning = lease.acquire()
    assert warning and reason in warning and "took over the lease" in warning
    assert _holder(tmp_path)["token"] == lease.me.token
    lease.release()


def test_the_same_job_continues_silently(tmp_path):
    _plant(tmp_path, host="pod-a", pid=1, job_id="lstm-fashion", age_s=1)  # the job's previous pod, just replaced
    lease = OutputLease(tmp_path, timeout_s=60, job_id="lstm-fashion")
    assert lease.acquire() is None
    assert _holder(tmp_path)["token"] == lease.me.token
    lease.release()


def test_heartbeat_refreshes_and_release_leaves_a_successor_alone(tmp_path):
    lease = OutputLease(tmp_path, timeout_s=5)  # a beat a second
    lease.acquire()
    first = _holder(tmp_path)["heartbeat"]
    time.sleep(2.5)
    assert _holder(tmp_path)["heartbeat"] > first
    _plant(tmp_path, host="node-7", token="successor")  # taken over behind our back
    lease.release()
    assert _holder(tmp_path)["token"] == "successor"


def test_job_identity():
    def identity(environ):
        return LaunchEnv.from_environ(environ).job_identity()

    assert identity({"PIPELINE_JOB_ID": "lstm-fashion", "TORCHELASTIC_RESTART_COUNT": "1"}) == "lstm-fashion"
    assert identity({"TORCHELASTIC_RESTART_COUNT": "0"}) == f"launcher {os.getppid()} on {socket.gethostname()}"
    assert identity({}) is None


@pytest.mark.slow
def test_second_run_into_a_busy_output_dir_is_refused_and_the_first_is_untouched(tmp_path, fashion_shards):
    out = tmp_path / "run"
    first = start_session([sys.executable, *train_args(out, fashion_shards, "wandb.mode=disabled", "train.max_steps=300")])
    wait_for_step(out, 20, first)
    second = train_run(out, fashion_shards, "wandb.mode=disabled", "train.max_steps=50", check=False)
    assert second.returncode == 2, second.stderr
    assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    events = read_jsonl(out / "metrics.jsonl")
    assert [e["step"] for e in events if "train/loss" in e] == list(range(10, 301, 10)), "one run's metrics, once"
    assert [e["step"] for e in events if "eval/accuracy" in e] == [50, 100, 150, 200, 250, 300]
    assert json.loads((out / "summary.json").read_text())["steps"] == 300
    assert not (out / LEASE_NAME).exists(), "the finished run gave its lease back"


@pytest.mark.slow
def test_every_rank_of_a_refused_launch_stops(tmp_path, fashion_shards):
    out = tmp_path / "run"
    _plant(out, host="node-7", pid=4242, age_s=1)
    start = time.monotonic()
    proc = train_run(out, fashion_shards, "wandb.mode=disabled", "train.max_steps=50", nproc=2, check=False, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "is in use by another run: pid 4242 on host node-7" in proc.stderr
    assert not (out / "metrics.jsonl").exists() and _holder(out)["token"] == "theirs"
