"""One global order of samples: the same global batches at any world size, worker count and placement.

Each test enumerates real batches from the real sources (the stream through its DataLoader
workers, the resident split) over the real Fashion-MNIST shards, and puts each step's global
batch back together from the ranks' micro-batches by their chunk index (order.py's layout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import canonical, order
from pipeline.data.augment import Augment, sample_random
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import load_manifest
from pipeline.data.order import BatchLayout
from pipeline.data.resident import ResidentBatches
from pipeline.data.store import ShardStore, read_blocks
from pipeline.data.stream import TrainStream
from pipeline.errors import ConfigError
from pipeline.training.batches import StreamBatches

GLOBAL, MICRO, SEED, WINDOW = 256, 64, 7, 4096
AUGMENT = Augment(SEED, hflip=True, shift=2)


def _source(manifest, shards, plan, rank, placement, workers, augment=AUGMENT):
    if placement == "device":
        return ResidentBatches(manifest, ShardStore(str(shards)), "train", plan, rank, torch.device("cpu"), augment)
    stream = TrainStream(manifest, ShardStore(str(shards)), "train", plan, rank, augment, workers=workers)
    return StreamBatches(stream, seed=0, data_dir=str(shards), pin_memory=False, record_sample_ids=False)


def global_batches(shards, world: int, workers: int, placement: str, epoch: int = 1, start: int = 0,
                   count: int | None = None, augment: Augment = AUGMENT, streams: int = 1,
                   bytes_read: list | None = None, micro: int = MICRO) -> tuple[np.ndarray, np.ndarray]:
    """(ids [steps, G], images [steps, G, 28, 28]) of the epoch's global batches, rebuilt from every rank's steps;
    each rank's bytes read appended to `bytes_read`."""
    manifest = load_manifest(shards)
    layout = BatchLayout.make(GLOBAL, micro, world)
    plan = EpochPlan.make(manifest, "train", layout, SEED, WINDOW, streams=streams)
    count = plan.steps - start if count is None else count
    sources = [_source(manifest, shards, plan, r, placement, workers, augment) for r in range(world)]
    ranks = [list(source.epoch(epoch, start, count)) for source in sources]
    if bytes_read is not None:
        bytes_read.extend(source.bytes_read for source in sources)
    ids, images = [], []
    for k in range(count):
        chunks = {order.chunk_index(layout, r, a): micro for r in range(world) for a, micro in enumerate(ranks[r][k])}
        assert sorted(chunks) == list(range(layout.chunks)) and all(len(c[1]) == micro for c in chunks.values())
        ids.append(np.concatenate([chunks[c][2].numpy() for c in range(layout.chunks)]))
        images.append(np.concatenate([chunks[c][0].numpy() for c in range(layout.chunks)]))
    return np.stack(ids), np.stack(images)


@pytest.fixture(scope="module")
def reference(fashion_shards):
    """One process, everything by accumulation, read in the main process: epoch 1's global batches.
    (The stream: about a second; the resident split takes ten. Both are compared below.)"""
    return global_batches(fashion_shards, 1, 0, "stream")


@pytest.mark.slow  # whole epochs, through loader workers, at several world sizes: seconds each
@pytest.mark.parametrize("world,workers,placement", [
    (1, 0, "stream"), (1, 2, "stream"), (2, 0, "stream"), (2, 2, "stream"), (4, 0, "stream"), (4, 2, "stream"),
    (1, 0, "device"), (2, 0, "device"), (4, 0, "device"),
])
def test_every_world_size_worker_count_and_placement_draws_the_same_global_batches(fashion_shards, reference, world,
                                                                                   workers, placement):
    ids, images = global_batches(fashion_shards, world, workers, placement)
    np.testing.assert_array_equal(ids, reference[0])
    np.testing.assert_array_equal(images, reference[1])  # augmentation included: it belongs to the sample


def test_an_epoch_uses_every_sample_once_but_its_last_partial_global_batch(reference, fashion_shards):
    ids, _ = reference
    n = load_manifest(fashion_shards).split("train").num_samples
    assert ids.shape == (n // GLOBAL, GLOBAL)
    assert len(np.unique(ids)) == ids.size == n - n % GLOBAL
    manifest = load_manifest(fashion_shards)
    sizes = [s.num_samples for s in manifest.split("train").shards]
    sequence = canonical.epoch_sequence(sizes, None, SEED, 1, WINDOW, BatchLayout(GLOBAL, MICRO, 1))
    assert sorted(sequence.tolist()) == list(range(n))  # the whole split, each position once
    every_id = np.concatenate([b.ids for s in manifest.split("train").shards
                               for b in read_blocks(ShardStore(str(fashion_shards)), s)])
    np.testing.assert_array_equal(ids.ravel(), every_id[sequence[:ids.size]])  # the stream trains this order


def test_epochs_and_seeds_reorder_and_the_order_is_a_pure_function(fashion_shards):
    sizes = [s.num_samples for s in load_manifest(fashion_shards).split("train").shards]
    layout = BatchLayout(GLOBAL, MICRO, 1)
    first = canonical.epoch_sequence(sizes, None, SEED, 0, WINDOW, layout)
    np.testing.assert_array_equal(first, canonical.epoch_sequence(list(sizes), None, SEED, 0, WINDOW, layout))
    assert not np.array_equal(first, canonical.epoch_sequence(sizes, None, SEED, 1, WINDOW, layout))
    assert not np.array_equal(first, canonical.epoch_sequence(sizes, None, SEED + 1, 0, WINDOW, layout))
    # Within a window too, not only by regrouping the shards into other windows.
    within = [order.window_permutation(SEED, epoch, 0, 4096) for epoch in (0, 1)]
    assert not np.array_equal(*within) and sorted(within[1]) == list(range(4096))
    units = canonical.epoch_units(sizes, SEED, 0, WINDOW, 1)
    assert all(a == 0 and b == sizes[shard] for unit in units for shard, a, b in unit.pieces)
    windows = [[shard for shard, _, _ in unit.pieces] for unit in units]
    assert sorted(s for w in windows for s in w) == list(range(len(sizes)))  # one stream: whole shards, each once
    assert all(sum(sizes[s] for s in w) >= WINDOW for w in windows[:-1])  # the bounded shuffle is at least that wide


@pytest.mark.parametrize("placement,workers", [("stream", 2), pytest.param("device", 0, marks=pytest.mark.slow)])
def test_a_resumed_epoch_draws_what_the_uninterrupted_one_did_on_another_world_size(fashion_shards, reference,
                                                                                   placement, workers):
    ids, images = global_batches(fashion_shards, 2, workers, placement, start=100, count=30)
    np.testing.assert_array_equal(ids, reference[0][100:130])
    np.testing.assert_array_equal(images, reference[1][100:130])


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused_with_the_numbers():
    assert BatchLayout.make(256, 64, 2).accumulation == 2
    assert BatchLayout.make(None, 64, 3).global_batch == 192  # unset: batch_size x processes
    with pytest.raises(ConfigError) as err:
        BatchLayout.make(256, 64, 3)
    message = str(err.value)
    assert err.value.exit_code == 2
    assert all(s in message for s in ("train.global_batch_size 256", "train.batch_size 64", "on 3 process(es)"))
    assert "the world size can be 1, 2, 4" in message


def test_a_rank_s_micro_batches_tile_the_global_batch():
    layout = BatchLayout.make(256, 32, 2)
    covered = sorted(p for r in range(2) for a in range(layout.accumulation)
                     for p in range(*order.micro_positions(layout, r, 3, a).indices(10**6)))
    assert covered == list(range(3 * 256, 4 * 256))
    positions = np.arange(3 * 256, 4 * 256)
    for r in range(2):
        mine = positions[canonical.rank_keeps(layout, 1, 0, positions, r)]
        expected = np.concatenate([np.arange(*order.micro_positions(layout, r, 3, a).indices(10**6))
                                   for a in range(layout.accumulation)])
        np.testing.assert_array_equal(mine, expected)  # the stream's mask and the resident slices agree
    assert order.chunk_seed(0, 5, 3) == order.chunk_seed(0, 5, 3) != order.chunk_seed(0, 5, 4)


def test_sample_random_numbers_are_the_same_bits_in_numpy_and_torch():
    ids = np.arange(70000, dtype=np.int64)
    a = sample_random(12345, 3, ids, 1)
    np.testing.assert_array_equal(a, sample_random(12345, 3, torch.from_numpy(ids), 1).numpy())
    assert 0 <= a.min() and a.max() < 2**32 and 0.49 < (a & 1).mean() < 0.51
    assert not np.array_equal(a, sample_random(12345, 4, ids, 1)) and not np.array_equal(a, sample_random(12345, 3, ids, 2))


def test_augmentation_mirrors_and_shifts_each_sample_by_its_own_draw(fashion_shards):
    manifest = load_manifest(fashion_shards)
    source = ShardStore(str(fashion_shards))
    block = next(read_blocks(source, manifest.split("train").shards[0]))
    assert (block.lengths == 28).all()
    x, ids = block.values.reshape(len(block), 28, 28), block.ids
    out = AUGMENT.numpy(x, ids, epoch=0)
    seen = set()
    for img, orig in zip(out, x, strict=True):
        found = [(flip, dy, dx) for flip in (False, True) for dy in range(5) for dx in range(5)
                 if np.array_equal(img, np.pad(orig[:, ::-1] if flip else orig, 2)[dy:dy + 28, dx:dx + 28])]
        assert found, "not a mirrored and shifted copy of its original"
        seen.update(found)
    assert {f for f, _, _ in seen} == {False, True} and len({(dy, dx) for _, dy, dx in seen}) == 25
    # The same sample is augmented the same wherever it lands in a batch, and anew next epoch.
    perm = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(AUGMENT.numpy(x[perm], ids[perm], 0), out[perm])
    assert not np.array_equal(AUGMENT.numpy(x, ids, 1), out)
    np.testing.assert_array_equal(AUGMENT.torch(torch.from_numpy(x), torch.from_numpy(ids), 0).numpy(), out)


def test_random_erasing_blanks_one_rectangle_in_the_chosen_share_of_images():
    erase = Augment(SEED, erase=0.5, erase_area=(0.05, 0.2))
    x = np.random.default_rng(0).integers(1, 256, size=(4000, 28, 28), dtype=np.uint8)  # no zeros: the blank shows
    ids = np.arange(4000, dtype=np.int64)
    out = erase.numpy(x, ids, epoch=0)
    np.testing.assert_array_equal(out, erase.torch(torch.from_numpy(x), torch.from_numpy(ids), 0).numpy())
    blank = out == 0
    hit = blank.reshape(len(x), -1).any(1)
    assert 0.46 < hit.mean() < 0.54
    for img in np.flatnonzero(hit)[:200]:
        rows, cols = np.flatnonzero(blank[img].any(1)), np.flatnonzero(blank[img].any(0))
        assert blank[img].sum() == len(rows) * len(cols), "one solid rectangle"
        assert np.ptp(rows) + 1 == len(rows) and np.ptp(cols) + 1 == len(cols)
        assert 0.05 * 784 - 28 <= blank[img].sum() <= 0.2 * 784 + 28  # the area range, up to rounding one side
    np.testing.assert_array_equal(out[~hit], x[~hit])  # the others are untouched
    assert not np.array_equal(erase.numpy(x, ids, epoch=1), out), "drawn anew each epoch"


def test_a_global_batch_larger_than_the_split_is_halved_alike_at_any_world_size():
    one = order.fit_to_split(BatchLayout.make(32, 32, 1), 20)
    two = order.fit_to_split(BatchLayout.make(32, 16, 2), 20)
    assert (one.global_batch, one.micro_batch) == (16, 16) and (two.global_batch, two.micro_batch) == (16, 8)
    assert order.fit_to_split(BatchLayout.make(32, 32, 1), 5).global_batch == 4
    assert order.fit_to_split(BatchLayout.make(24, 12, 2), 13) == BatchLayout(12, 6, 2)
    fits = BatchLayout.make(32, 16, 2)
    assert order.fit_to_split(fits, 32) is fits and order.fit_to_split(fits, 5000) is fits
    # past what halving can reach, the layout stays and steps_in_epoch refuses it with the numbers
    assert order.fit_to_split(BatchLayout.make(30, 15, 2), 4) == BatchLayout(30, 15, 2)
    # the global batch never depends on the world size: W = 2, 4, 8 with micro-batches of 8 all give 16
    assert {order.fit_to_split(BatchLayout.make(64, 8, w), 20) for w in (2, 4, 8)} == {BatchLayout(16, 2, w) for w in (2, 4, 8)}


@pytest.mark.slow
@pytest.mark.parametrize("world,workers,placement", [(1, 2, "stream"), (2, 0, "stream"), (4, 2, "stream"),
                                                     (1, 0, "device"), (4, 0, "device")])
def test_canonical_streams_draw_the_same_global_batches_at_any_world_size(fashion_shards, world, workers, placement):
    """Four canonical streams: one epoch's global batches at W = 1, 2, 4, streamed or resident, equal those
    canonical.epoch_sequence lays out, and differ from the one-stream order."""
    ids, images = global_batches(fashion_shards, world, workers, placement, streams=4)
    manifest = load_manifest(fashion_shards)
    sizes = [s.num_samples for s in manifest.split("train").shards]
    expected = canonical.epoch_sequence(sizes, None, SEED, 1, WINDOW, BatchLayout(GLOBAL, MICRO, 1), 4)
    every_id = np.concatenate([b.ids for s in manifest.split("train").shards
                               for b in read_blocks(ShardStore(str(fashion_shards)), s)])
    np.testing.assert_array_equal(ids.ravel(), every_id[expected])
    assert images.shape[:2] == ids.shape


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 8])
def test_a_rank_reads_its_share_of_the_bytes(fashion_shards, world):
    """Eight canonical streams, streamed: each rank reads at most 1.15 / W of the split's bytes plus one shard
    per stream boundary, and W = 1 reads the split once."""
    manifest = load_manifest(fashion_shards)
    shards = manifest.split("train").shards
    split_bytes, largest = sum(s.bytes for s in shards), max(s.bytes for s in shards)
    per_rank: list[int] = []
    global_batches(fashion_shards, world, 0, "stream", epoch=0, streams=8, bytes_read=per_rank, micro=32)
    assert len(per_rank) == world
    assert max(per_rank) <= 1.15 * split_bytes / world + (8 - 1) * largest, (per_rank, split_bytes)
    assert sum(per_rank) <= split_bytes + 2 * (8 - 1) * largest  # read about once in all, not W times
    one: list[int] = []
    global_batches(fashion_shards, 1, 0, "stream", epoch=0, streams=8, bytes_read=one, micro=32)
    assert split_bytes * 0.99 <= one[0] <= split_bytes + (8 - 1) * largest
