"""The stream: equal steps per rank, disjoint ranks, every sample once per epoch, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.manifest import load_manifest
from pipeline.data.stream import (
    ShardSource,
    StreamPlan,
    TrainStream,
    epoch_assignment,
    make_train_loader,
    merge_partial_batches,
    read_blocks,
    shift_images,
)
from pipeline.errors import DataError


def _epoch_ids(shards_dir, world: int, workers: int, batch: int, epoch: int = 0, seed: int = 0) -> list[np.ndarray]:
    manifest = load_manifest(shards_dir)
    plan = StreamPlan(batch, world, workers, seed)
    steps = plan.steps_in_epoch(manifest, "train", epoch)
    per_rank = []
    for rank in range(world):
        stream = TrainStream(manifest, ShardSource(str(shards_dir)), "train", plan, rank, shuffle_buffer=2048)
        stream.set_epoch(epoch)
        loader = make_train_loader(stream, pin_memory=False)
        loader.generator = torch.Generator().manual_seed(0)
        batches = merge_partial_batches(iter(loader), batch)
        ids = [next(batches)[2].numpy() for _ in range(steps)]
        assert all(len(b) == batch for b in ids)
        per_rank.append(np.stack(ids))
    return per_rank


def test_single_rank_epoch_covers_all_but_tail(fashion_shards):
    (ids,) = _epoch_ids(fashion_shards, world=1, workers=0, batch=100)
    flat = ids.ravel()
    assert len(np.unique(flat)) == len(flat) == 60000, "100 divides every 1250-sample shard: nothing dropped"


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (3, 1), (8, 4)])
def test_ranks_disjoint_equal_steps(fashion_shards, world, workers):
    ranks = _epoch_ids(fashion_shards, world=world, workers=workers, batch=64)
    assert len({r.shape for r in ranks}) == 1, "every rank takes the same number of steps"
    flat = np.concatenate([r.ravel() for r in ranks])
    assert len(np.unique(flat)) == len(flat), "no sample seen twice within an epoch"
    assert len(flat) > 60000 * 0.95


def test_epochs_reshuffle_and_seed_determinism(fashion_shards):
    a0 = _epoch_ids(fashion_shards, 2, 1, 64, epoch=0)
    a0_again = _epoch_ids(fashion_shards, 2, 1, 64, epoch=0)
    a1 = _epoch_ids(fashion_shards, 2, 1, 64, epoch=1)
    for x, y in zip(a0, a0_again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a0[0][:5], a1[0][:5])
    assert set(a0[0].ravel()) != set(a1[0].ravel()), "shard-to-rank assignment changes per epoch (webdataset#502)"


def test_assignment_is_a_partition():
    assign = epoch_assignment(48, seed=3, epoch=2, world_size=4, num_workers=3)
    flat = sorted(i for rank in assign for worker in rank for i in worker)
    assert flat == list(range(48))


def test_too_few_shards_clear_error(fashion_shards):
    manifest = load_manifest(fashion_shards)
    with pytest.raises(DataError, match="at least 64"):
        StreamPlan(64, world_size=16, num_workers=4, seed=0).check(manifest, "train")


def test_shift_images_moves_each_image_by_its_own_offset():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, size=(200, 28, 28), dtype=np.uint8)  # no zeros: the fill is visible
    out = shift_images(x, 2, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    offsets = []
    for i in range(len(x)):
        (match,) = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(out[i], padded[i, dy:dy + 28, dx:dx + 28])]
        offsets.append(match)
    assert len(set(offsets)) == 25, "every offset in [-2, 2] x [-2, 2] occurs"


def test_augmented_stream_yields_flipped_and_shifted_originals(fashion_shards):
    manifest = load_manifest(fashion_shards)
    source = ShardSource(str(fashion_shards))
    originals = {}
    for shard in manifest.split("train").shards:
        for x, _, idx in read_blocks(source, shard):
            originals.update(zip(idx.tolist(), x, strict=True))
    plan = StreamPlan(128, 1, 0, 0)
    stream = TrainStream(manifest, source, "train", plan, 0, shuffle_buffer=1024, hflip=True, shift=2)
    seen_flip, seen_offsets = set(), set()
    for _, (xb, _, ib) in zip(range(3), stream, strict=False):
        for img, i in zip(xb.numpy(), ib.tolist(), strict=True):
            candidates = []
            for flip in (False, True):
                base = np.pad(originals[i][:, ::-1] if flip else originals[i], 2)
                candidates += [(flip, (dy, dx)) for dy in range(5) for dx in range(5)
                               if np.array_equal(img, base[dy:dy + 28, dx:dx + 28])]
            assert candidates, f"sample {i} is not a mirrored/shifted copy of its original"
            seen_flip.update(flip for flip, _ in candidates)
            seen_offsets.update(offset for _, offset in candidates)
    assert seen_flip == {False, True}
    assert len(seen_offsets - {(2, 2)}) >= 20, "images are moved, not only copied (offset (2, 2) is no shift)"


@pytest.mark.parametrize("workers", [4, 8])
def test_at_most_one_partial_batch_per_rank_is_dropped_whatever_the_worker_count(fashion_shards, workers):
    # Each of 8 workers holds 7,500 samples at batch 4096: 1 full batch each, 45% of the epoch in
    # tails. Merged, the rank loses only 60,000 mod 4096 = 2,656 samples.
    (ids,) = _epoch_ids(fashion_shards, world=1, workers=workers, batch=4096)
    assert ids.shape == (60000 // 4096, 4096)
    assert len(np.unique(ids)) == ids.size == 60000 - 60000 % 4096


def test_persistent_workers_follow_the_epoch(fashion_shards):
    """One loader, two epochs: its workers survive the first and must still read the second's
    shards in the second's order, as a fresh loader for that epoch would."""
    manifest = load_manifest(fashion_shards)
    plan = StreamPlan(500, 1, 2, 0)
    stream = TrainStream(manifest, ShardSource(str(fashion_shards)), "train", plan, 0, shuffle_buffer=2048)
    loader = make_train_loader(stream, pin_memory=False)
    assert loader.persistent_workers
    seen = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        seen.append(np.stack([b[2].numpy() for b in merge_partial_batches(iter(loader), 500)][:20]))
    (fresh,) = _epoch_ids(fashion_shards, world=1, workers=2, batch=500, epoch=1)
    np.testing.assert_array_equal(seen[1], fresh[:20])
    assert not np.array_equal(seen[0], seen[1])
