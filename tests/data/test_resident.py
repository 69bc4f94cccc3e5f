"""Training data held in device memory (data.placement device/auto): placement, exact resume with
augmentation and dropout, two ranks. That its batches are the stream's: tests/data/test_order.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_in_process, train_run
from safetensors.torch import load_file

from pipeline.data.manifest import load_manifest
from pipeline.data.resident import choose_placement


def test_placement_choice(fashion_shards):
    manifest = load_manifest(fashion_shards)
    cpu = torch.device("cpu")
    assert choose_placement("stream", "raise", manifest, cpu)[0] == "stream"
    assert choose_placement("auto", "skip", manifest, cpu) == ("stream", "auto: data.on_error=skip needs the stream")
    placement, why = choose_placement("auto", "raise", manifest, cpu)
    assert placement == "device" and "the train split (42 MiB) fits in a quarter" in why
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
    assert "data placement device (auto: the train split (42 MiB) fits" in proc.stdout
    r0, r1 = (np.load(out / "sample_ids" / f"rank-0000{r}.npy") for r in (0, 1))
    assert r0.shape == r1.shape == (240, 128)
    # One epoch is 214 global batches of 256 (55,000 training samples; the last 216 dropped): in it no
    # sample repeats across the two ranks, and the next epoch starts over.
    epoch = np.concatenate([r0[:214].ravel(), r1[:214].ravel()])
    assert len(np.unique(epoch)) == len(epoch) == 214 * 256
    assert len(np.unique(np.concatenate([epoch, r0[214:].ravel()]))) < len(epoch) + r0[214:].size
