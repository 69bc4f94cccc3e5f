"""Elastic restarts (`--max_restarts`): a rank dies, the launcher restarts every rank, the run
resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import re
import signal
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import accelerate_cmd, free_port, train_args, train_run
from processes import kill_tree, start_session, train_ranks, wait_for_step
from safetensors.torch import load_file

from pipeline.distributed.elastic import FRESH_STORE_VAR, init_restartable_process_group
from pipeline.distributed.launch_env import LaunchEnv
from pipeline.errors import ConfigError

TWO_NODES_SHARED_STORE = {
    "TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1",
    "TORCHELASTIC_RESTART_COUNT": "0", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2", "RANK": "0",
    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
}


def test_restarts_across_nodes_on_a_shared_store_are_refused_up_front():
    with pytest.raises(ConfigError, match=f"export {FRESH_STORE_VAR}=1") as err:
        init_restartable_process_group(timedelta(seconds=1), "gloo", LaunchEnv.from_environ(TWO_NODES_SHARED_STORE))
    assert "--max_restarts 1" in str(err.value) and "2 nodes" in str(err.value)


@pytest.mark.parametrize("change", [
    {"TORCHELASTIC_RUN_ID": None},  # not under torchrun
    {"TORCHELASTIC_USE_AGENT_STORE": "False"},  # the launcher asked for a fresh store per round
    {"TORCHELASTIC_MAX_RESTARTS": "0"},  # nothing is ever restarted
    {"WORLD_SIZE": "1"},
], ids=["plain", "fresh-store", "no-restarts", "one-process"])
def test_launches_that_cannot_collide_are_left_to_accelerate(change):
    env = {k: v for k, v in {**TWO_NODES_SHARED_STORE, **change}.items() if v is not None}
    assert init_restartable_process_group(timedelta(seconds=1), "gloo", LaunchEnv.from_environ(env)) is False
    assert not dist.is_initialized()


@pytest.mark.slow
def test_killed_rank_is_restarted_and_the_run_resumes_bit_identically(tmp_path, fashion_shards):
    overrides = ["train.max_steps=600", "checkpoint.every_steps=20", "train.log_every_steps=1", "wandb.mode=disabled"]
    out = tmp_path / "elastic"
    launch = [*accelerate_cmd(2), "--max_restarts", "1", "--rdzv_backend", "c10d"]
    # On one machine accelerate passes torchrun no rendezvous endpoint, so c10d would take port
    # 29400 whatever --main_process_port says, and meet whatever else holds it (a closed
    # rendezvous of an earlier launch: RendezvousClosedError). torchrun reads PET_* for its options.
    endpoint = {"PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "PET_RDZV_ID": out.parent.name}
    proc = start_session([*launch, *train_args(out, fashion_shards, *overrides), "--resume", "auto"], env=endpoint)
    try:
        wait_for_step(out, 30, proc)
        os.kill(train_ranks(proc.pid, 2)[-1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr[-4000:]
    resumed_at = int(re.search(r"resumed from \S+step-(\d+)", stdout).group(1))
    assert resumed_at >= 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["resumed"] and summary["steps"] == 600 and summary["world_size"] == 2

    straight = tmp_path / "straight"
    train_run(straight, fashion_shards, *overrides, nproc=2)
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights equal the uninterrupted 2-process run's, bit for bit"

    # One process continues a two-process checkpoint of the same global batch (the run is complete:
    # nothing is left to train); a global batch that is no whole number of micro-batches is refused, with both.
    again = train_run(out, fashion_shards, *overrides, resume="auto")
    assert "world size 2 -> 1: the same global batch of 256, now 1 x 2 x 128" in again.stdout
    odd = train_run(out, fashion_shards, *overrides, "train.global_batch_size=288", resume="auto", check=False)
    assert odd.returncode == 2 and "Traceback" not in odd.stderr, odd.stderr[-3000:]
    assert "train.global_batch_size (288) must be a multiple of train.batch_size (128)" in odd.stderr
