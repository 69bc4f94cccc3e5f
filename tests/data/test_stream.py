"""The stream's own mechanics: persistent workers that follow the epoch and its start, and a
resumed epoch that reads nothing before where it starts. What it yields is order.py's order
(tests/data/test_order.py holds it to the resident batches and to every world size)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.augment import Augment
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import load_manifest
from pipeline.data.order import BatchLayout
from pipeline.data.store import ShardStore
from pipeline.data.stream import TrainStream
from pipeline.training.batches import StreamBatches


def _stream(shards, workers: int, source: ShardStore | None = None) -> StreamBatches:
    manifest = load_manifest(shards)
    plan = EpochPlan.make(manifest, "train", BatchLayout.make(500, 250, 1), 0, 2048)
    stream = TrainStream(manifest, source or ShardStore(str(shards)), "train", plan, 0, Augment(0), workers=workers)
    return StreamBatches(stream, seed=0, data_dir=str(shards), pin_memory=False, record_sample_ids=False)


def _ids(steps) -> np.ndarray:
    return np.stack([torch.cat([m[2] for m in micro]).numpy() for micro in steps])


def test_persistent_workers_follow_the_epoch_and_its_starting_step(fashion_shards):
    """One loader, two epochs: its workers survive the first and must read the second from step
    50 in the second's order, as a fresh loader for that epoch would."""
    batches = _stream(fashion_shards, workers=2)
    assert batches.loader.persistent_workers
    first = _ids(batches.epoch(0, 0, 20))
    second = _ids(batches.epoch(1, 50, 20))
    np.testing.assert_array_equal(second, _ids(_stream(fashion_shards, workers=0).epoch(1, 50, 20)))
    assert not np.array_equal(first, second)


class CountingSource(ShardStore):
    opened: list[str] = []

    def open(self, shard):
        CountingSource.opened.append(shard.url)
        return super().open(shard)


def test_a_resumed_epoch_reads_no_window_that_ends_before_its_start(fashion_shards):
    source = CountingSource(str(fashion_shards))
    CountingSource.opened = []
    list(_stream(fashion_shards, workers=0, source=source).epoch(0, 100, 1))  # step 100: samples 50,000 to 50,500
    assert 1 <= len(CountingSource.opened) <= 8, "only the window(s) holding step 100 were read"
