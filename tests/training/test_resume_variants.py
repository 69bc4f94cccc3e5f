"""Every recurrent cell and an epoch-based run: trains on the real shards, its loss falls, and a run
stopped at a checkpoint then resumed equals the uninterrupted run bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_jsonl, train_in_process, train_run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


def _stable(events):  # timings differ run to run; everything else must not
    return [{k: v for k, v in e.items() if k not in ("train/samples_per_s", "eval/seconds", "time_s")} for e in events]


def _straight_and_resumed(tmp_path, shards, stop_at: int, *overrides: str):
    straight, split = tmp_path / "straight", tmp_path / "split"
    full = train_in_process(straight, shards, *overrides)
    train_in_process(split, shards, *overrides, f"train.stop_at_step={stop_at}")
    checkpoint = json.loads((split / "checkpoints" / f"step-{stop_at:08d}" / "state.json").read_text())
    resumed = train_in_process(split, shards, *overrides, resume="auto")
    return full, resumed, checkpoint, straight, split


@pytest.mark.parametrize("model", [
    ["model.cell=gru"],
    ["model.cell=rnn"],
    ["model.cell=lstm", "model.bidirectional=true"],
], ids=["gru", "rnn", "bidirectional-lstm"])
def test_cell_trains_and_resumes_bit_identically(tmp_path, fashion_shards, model):
    overrides = (*model, "model.hidden_size=32", "train.max_steps=80", "eval.every_steps=40",
                 "checkpoint.every_steps=40", "train.log_every_steps=10")
    full, resumed, _, straight, split = _straight_and_resumed(tmp_path, fashion_shards, 40, *overrides)
    losses = [e["train/loss"] for e in read_jsonl(straight / "metrics.jsonl") if "train/loss" in e]
    assert losses[-1] < 0.75 * losses[0], f"the loss does not fall: {losses}"
    assert full["final_eval_accuracy"] > 0.5
    a, b = _weights(straight), _weights(split)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _stable(read_jsonl(straight / "metrics.jsonl")) == _stable(read_jsonl(split / "metrics.jsonl"))
    assert resumed["resumed"] and resumed["steps"] == full["steps"] == 80


def test_epoch_based_run_resumes_exactly_at_an_epoch_boundary(tmp_path, fashion_shards):
    # No max_steps: the length comes from train.epochs. 55,000 training samples (5,000 are held out
    # for validation) in batches of 1000 on one rank: 55 steps per epoch, 110 in two epochs; the
    # split run stops exactly at the boundary.
    overrides = ("train.max_steps=null", "train.epochs=2", "train.batch_size=1000", "train.global_batch_size=1000", "model.hidden_size=16",
                 "schedule.warmup_steps=5", "eval.every_steps=55", "checkpoint.every_steps=55", "train.log_every_steps=5")
    full, resumed, checkpoint, straight, split = _straight_and_resumed(tmp_path, fashion_shards, 55, *overrides)
    assert full["steps"] == 110 and full["samples_seen"] == 110_000 and full["completed"]
    assert full["train_state"]["epoch"] == 2 and full["train_state"]["step_in_epoch"] == 0
    # The checkpoint at the boundary says: next is epoch 1, batch 0.
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["step_in_epoch"]) == (1, 0)
    epochs = {e["step"]: e["train/epoch"] for e in read_jsonl(straight / "metrics.jsonl") if "train/epoch" in e}
    assert epochs[55] == 1.0 and epochs[110] == 2.0 and epochs[65] == pytest.approx(1 + 10 / 55)
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming at the epoch boundary changed the run"
    assert _stable(read_jsonl(straight / "metrics.jsonl")) == _stable(read_jsonl(split / "metrics.jsonl"))
    assert resumed["steps"] == 110 and resumed["resumed"]


@pytest.mark.slow
def test_one_global_batch_at_any_world_size_and_resumed_across_world_sizes(tmp_path, fashion_shards):
    """configs/cpu_test.yaml, fp32, global batch 256: 2 processes x 128 and 1 process x 2
    accumulation steps x 128 compute the same micro-batches and sums; so do runs stopped at step
    100 and resumed on the other world size. One torch thread per process on both sides (the
    thread count changes float sums)."""
    common = ("train.log_every_steps=1", "checkpoint.every_steps=100")
    one_thread = {"OMP_NUM_THREADS": "1"}
    runs = {
        "1": [(1, None, ())],
        "2": [(2, None, ())],
        "2->1": [(2, None, ("train.stop_at_step=100",)), (1, "auto", ())],
        "1->2": [(1, None, ("train.stop_at_step=100",)), (2, "auto", ())],
    }
    for name, legs in runs.items():
        for nproc, resume, extra in legs:
            proc = train_run(tmp_path / name, fashion_shards, "wandb.mode=disabled", *common, *extra, nproc=nproc,
                             resume=resume, env=one_thread)
            if resume:
                assert f"world size {3 - nproc} -> {nproc}: the same global batch of 256" in proc.stdout
    reference = _weights(tmp_path / "1")
    losses = {n: [e["train/loss"] for e in read_jsonl(tmp_path / n / "metrics.jsonl") if "train/loss" in e] for n in runs}
    for name in ("2", "2->1", "1->2"):  # the README says bit for bit: torch.equal, and losses equal as floats
        weights = _weights(tmp_path / name)
        assert set(weights) == set(reference) and all(torch.equal(weights[k], reference[k]) for k in reference), name
        assert len(losses[name]) == 300 and losses[name] == losses["1"], name
    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in runs}
    assert {n: s["world_size"] for n, s in summaries.items()} == {"1": 1, "2": 2, "2->1": 1, "1->2": 2}
    assert {s["samples_seen"] for s in summaries.values()} == {300 * 256}


@pytest.mark.slow
def test_canonical_streams_train_alike_at_one_and_two_processes(tmp_path, fashion_shards):
    """data.canonical_streams=2, streamed: 1 process x 2 accumulation steps x 128 and 2 x 1 x 128 end with the
    same weights bit for bit (fp32, one thread per process), each of the two ranks reading about half of what
    one process reads; so does a run stopped at 2 processes and resumed at 1."""
    common = ("wandb.mode=disabled", "data.canonical_streams=2", "data.placement=stream", "train.max_steps=60",
              "eval.every_steps=60", "checkpoint.every_steps=30", "train.log_every_steps=1")
    one_thread = {"OMP_NUM_THREADS": "1"}
    for nproc in (1, 2):
        train_run(tmp_path / f"w{nproc}", fashion_shards, *common, nproc=nproc, env=one_thread)
    train_run(tmp_path / "w2-1", fashion_shards, *common, "train.stop_at_step=30", nproc=2, env=one_thread)
    train_run(tmp_path / "w2-1", fashion_shards, *common, nproc=1, resume="auto", env=one_thread)
    reference = _weights(tmp_path / "w1")
    for name in ("w2", "w2-1"):
        weights = _weights(tmp_path / name)
        assert all(torch.equal(weights[k], reference[k]) for k in reference), name
    read = {n: json.loads((tmp_path / n / "summary.json").read_text())["data_bytes_read"] for n in ("w1", "w2")}
    assert len(read["w2"]) == 2 and len(read["w1"]) == 1
    assert max(read["w2"]) <= 0.6 * read["w1"][0], read


@pytest.mark.slow
def test_exact_reduction_trains_alike_at_one_two_and_four_processes(tmp_path, fashion_shards):
    """train.exact_reduction with four canonical streams, streamed: 1 x 4 accumulation steps x 64, 2 x 2 x 64 and
    4 x 1 x 64 end with the same weights bit for bit (fp32, one thread per process), and so does a run stopped
    at 4 processes and resumed at 2; without it 2 x 2 parts from 1 x 4 (DDP adds in another order)."""
    common = ("wandb.mode=disabled", "data.canonical_streams=4", "data.placement=stream", "train.batch_size=64",
              "train.max_steps=40", "eval.every_steps=40", "checkpoint.every_steps=20", "train.log_every_steps=1")
    exact, one_thread = "train.exact_reduction=true", {"OMP_NUM_THREADS": "1"}
    for nproc in (1, 2, 4):
        train_run(tmp_path / f"w{nproc}", fashion_shards, *common, exact, nproc=nproc, env=one_thread)
    train_run(tmp_path / "w4-2", fashion_shards, *common, exact, "train.stop_at_step=20", nproc=4, env=one_thread)
    train_run(tmp_path / "w4-2", fashion_shards, *common, exact, nproc=2, resume="auto", env=one_thread)
    train_run(tmp_path / "ddp2", fashion_shards, *common, nproc=2, env=one_thread)
    train_run(tmp_path / "ddp1", fashion_shards, *common, nproc=1, env=one_thread)
    reference = _weights(tmp_path / "w1")
    same = {n: all(torch.equal(_weights(tmp_path / n)[k], reference[k]) for k in reference)
            for n in ("w2", "w4", "w4-2", "ddp2")}
    assert same == {"w2": True, "w4": True, "w4-2": True, "ddp2": False}
    plain = _weights(tmp_path / "ddp1")
    assert not all(torch.equal(_weights(tmp_path / "ddp2")[k], plain[k]) for k in plain), "without it, 2 x 2 != 1 x 4"
    read = json.loads((tmp_path / "w4" / "summary.json").read_text())["data_bytes_read"]
    assert len(read) == 4 and max(read) <= 0.3 * json.loads((tmp_path / "w1" / "summary.json").read_text())["data_bytes_read"][0]
