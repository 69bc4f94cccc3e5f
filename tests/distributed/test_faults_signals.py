"""Preemption and crashes with real processes and real signals: nothing saved is lost."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import accelerate_cmd, read_jsonl, train_args, train_run
from processes import kill_tree, start_session, train_ranks, wait_for_step
from safetensors.torch import load_file
from wandb_records import find_logs, parse_finished

pytestmark = pytest.mark.slow


def _steps_of(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


def test_sigterm_checkpoints_current_step_and_resumes(tmp_path, fashion_shards):
    out = tmp_path / "run"
    proc = start_session([sys.executable, *train_args(out, fashion_shards, "train.max_steps=400", "checkpoint.every_steps=1000",
                                          "train.log_every_steps=1", "wandb.mode=offline", "wandb.media_every_evals=1000")])
    wait_for_step(out, 30, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 143, stderr
    assert elapsed < 30, f"checkpoint and exit took {elapsed:.1f} s"
    assert "SIGTERM received" in stderr and "--resume auto" in stderr and "Traceback" not in stderr
    (stopped,) = _steps_of(out)
    last_logged = max(e["step"] for e in read_jsonl(out / "metrics.jsonl"))
    assert stopped == last_logged, "the checkpoint is of the step the ranks finished"
    (log,) = [parse_finished(p) for p in find_logs(tmp_path)]
    assert log.preempting and log.exit.exit_code == 143, "W&B run marked preempted with the exit code"

    resumed = train_run(out, fashion_shards, "train.max_steps=400", "checkpoint.every_steps=1000",
                        "train.log_every_steps=1", "wandb.mode=offline", resume="auto")
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:08d}'}" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 400


def test_sigterm_to_launcher_stops_all_ranks_at_the_same_step(tmp_path, fashion_shards):
    out = tmp_path / "ddp"
    proc = start_session([*accelerate_cmd(2), *train_args(out, fashion_shards, "train.max_steps=2000", "checkpoint.every_steps=1000",
                                               "train.log_every_steps=1", "wandb.mode=disabled", "data.record_sample_ids=true")])
    wait_for_step(out, 20, proc)
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends to the container's main process
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    assert proc.returncode == 143, stderr[-3000:]  # the launcher passes the ranks' 128 + SIGTERM on
    assert stderr.count("stopped: SIGTERM received") == 1, "the shared message is printed by rank 0 alone"
    (stopped,) = _steps_of(out)
    assert stopped >= 20
    state = json.loads((out / "checkpoints" / f"step-{stopped:08d}" / "state.json").read_text())
    assert state["state"]["step"] == stopped and state["world_size"] == 2


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, fashion_shards):
    common = ("train.max_steps=150", "checkpoint.every_steps=7", "checkpoint.keep_last=2", "eval.every_steps=50",
              "model.num_layers=2", "model.hidden_size=32", "model.dropout=0.2", "wandb.mode=disabled",
              "train.log_every_steps=5")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_run(straight, fashion_shards, *common)

    # Kill at several points; checkpoints every 7 steps mean a good share of wall time is inside
    # a checkpoint write, and the delays vary where the kill lands.
    for i, delay in enumerate((0.3, 0.55, 0.8)):
        args = [sys.executable, *train_args(killed, fashion_shards, *common)] + (["--resume", "auto"] if i else [])
        proc = start_session(args)
        wait_for_step(killed, 30 * (i + 1), proc)
        time.sleep(delay)
        kill_tree(proc)
    train_run(killed, fashion_shards, *common, resume="auto")
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights equal the uninterrupted run's, bit for bit"


def test_sigkill_inside_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, fashion_shards):
    """The real write path killed between the weights and the state.json that completes them."""
    common = ("train.max_steps=60", "checkpoint.every_steps=20", "eval.every_steps=30", "wandb.mode=disabled",
              "train.log_every_steps=10", "model.hidden_size=32")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_run(straight, fashion_shards, *common)
    crashed = train_run(killed, fashion_shards, *common, check=False, env={"PIPELINE_FAULT": "checkpoint-write:40"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    half = killed / "checkpoints" / ".tmp-step-00000040"
    assert (half / "model.safetensors").is_file() and (half / "optimizer.pt").is_file()
    assert not (half / "state.json").exists() and not (killed / "checkpoints" / "step-00000040").exists()

    final = train_run(killed, fashion_shards, *common, resume="auto")
    assert "removed 1 incomplete checkpoint(s): .tmp-step-00000040" in final.stdout
    assert f"resumed from {killed / 'checkpoints' / 'step-00000020'} at step 20" in final.stdout
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights equal the uninterrupted run's, bit for bit"


def test_one_rank_dying_ends_the_job_in_bounded_time(tmp_path, fashion_shards):
    out = tmp_path / "ddp"
    proc = start_session([*accelerate_cmd(2), *train_args(out, fashion_shards, "train.max_steps=5000", "wandb.mode=disabled",
                                               "train.log_every_steps=1")])
    try:
        wait_for_step(out, 10, proc)
        victim = train_ranks(proc.pid, 2)[-1]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        kill_tree(proc)
    assert proc.returncode != 0
    assert took < 60, f"the surviving rank took {took:.0f} s to exit"
    assert "launch/train.py FAILED" in stderr or "ChildFailedError" in stderr, stderr[-2000:]
