"""Training data held in device memory (data.placement device/auto): the stream's contract kept,
batches as a pure function of (seed, epoch, rank, batch), exact resume with augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_in_process, train_run
from safetensors.torch import load_file

from pipeline.data.manifest import load_manifest
from pipeline.data.resident import ResidentBatches, choose_placement
from pipeline.data.stream import ShardSource, StreamPlan


@pytest.fixture(scope="module")
def resident(fashion_shards):
    manifest = load_manifest(fashion_shards)
    source = ShardSource(str(fashion_shards))

    def make(world: int = 1, rank: int = 0, batch: int = 500, **aug) -> ResidentBatches:
        return ResidentBatches(manifest, source, "train", StreamPlan(batch, world, 0, 7), rank, torch.device("cpu"), **aug)

    return make


def test_ranks_read_disjoint_samples_each_epoch_and_equal_steps(resident, fashion_shards):
    plan = StreamPlan(500, 2, 0, 7)
    steps = plan.steps_in_epoch(load_manifest(fashion_shards), "train", 3)
    ids = [torch.cat([b[2] for b in resident(2, r).epoch(3, 0, steps)]).numpy() for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == steps * 500
    assert len(np.unique(np.concatenate(ids))) == 2 * steps * 500, "no sample twice within an epoch, across ranks"
    again = torch.cat([b[2] for b in resident(2, 0).epoch(4, 0, steps)]).numpy()
    assert not np.array_equal(again, ids[0]), "the next epoch is shuffled anew"


def test_a_batch_depends_only_on_its_position_augmentation_included(resident):
    batches = resident(hflip=True, shift=2)
    whole = list(batches.epoch(1, 0, 8))
    tail = list(batches.epoch(1, 5, 3))
    for a, b in zip(whole[5:], tail, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), "resuming mid-epoch draws the same batches"


def test_hflip_on_the_device_mirrors_whole_images(resident):
    plain = next(resident().epoch(0, 0, 1))
    flipped = next(resident(hflip=True).epoch(0, 0, 1))
    assert torch.equal(plain[2], flipped[2]), "augmentation changes pixels, not which samples"
    same = (flipped[0] == plain[0]).flatten(1).all(1)
    mirrored = (flipped[0] == plain[0].flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0.35 < mirrored.float().mean() < 0.65


def test_placement_choice(fashion_shards):
    manifest = load_manifest(fashion_shards)
    cpu = torch.device("cpu")
    assert choose_placement("stream", "raise", manifest, cpu)[0] == "stream"
    assert choose_placement("auto", "skip", manifest, cpu) == ("stream", "auto: data.on_error=skip needs the stream")
    placement, why = choose_placement("auto", "raise", manifest, cpu)
    assert placement == "device" and "the train split (46 MiB) fits in a quarter" in why
    manifest.splits["train"].num_samples = 10**12  # a split far larger than any machine's memory
    placement, why = choose_placement("auto", "raise", manifest, cpu)
    assert placement == "stream" and "exceeds a quarter" in why


@pytest.mark.slow
def test_resident_run_with_augmentation_resumes_bit_identically(tmp_path, fashion_shards):
    common = ("data.placement=device", "data.hflip=true", "data.shift=2", "model.num_layers=2", "model.dropout=0.2",
              "model.hidden_size=32", "train.max_steps=80", "eval.every_steps=40", "checkpoint.every_steps=40")
    full = train_in_process(tmp_path / "straight", fashion_shards, *common)
    train_in_process(tmp_path / "split", fashion_shards, *common, "train.stop_at_step=40")
    resumed = train_in_process(tmp_path / "split", fashion_shards, *common, resume="auto")
    assert full["data_placement"] == resumed["data_placement"] == "device" and resumed["resumed"]
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_eval_accuracy"] == full["final_eval_accuracy"] > 0.5


@pytest.mark.slow
def test_two_ranks_resident(tmp_path, fashion_shards):
    out = tmp_path / "ddp"
    proc = train_run(out, fashion_shards, "wandb.mode=disabled", "train.max_steps=240", "eval.every_steps=120",
                     "checkpoint.every_steps=120", "data.record_sample_ids=true", nproc=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["data_placement"] == "device"
    assert "data placement device (auto: the train split (46 MiB) fits" in proc.stdout
    r0, r1 = (np.load(out / "sample_ids" / f"rank-0000{r}.npy") for r in (0, 1))
    assert r0.shape == r1.shape == (240, 128)
    first = np.concatenate([r0[:234].ravel(), r1[:234].ravel()])
    assert len(np.unique(first)) == len(first)
