"""The epoch's order (canonical.epoch_sequence, its one implementation) as pure functions: one stream
is the plain order, written out below; S streams cover the epoch once, give every global batch an
equal share of each stream, and a rank of W (W dividing S) touches only S / W of them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import canonical, order
from pipeline.data.order import BatchLayout
from pipeline.errors import ConfigError

RNG = np.random.default_rng(3)
SIZES = [int(n) for n in RNG.integers(40, 400, size=41)]
LENGTHS = RNG.integers(3, 200, size=sum(SIZES))


def _plain_order(sizes: list[int], seed: int, epoch: int, window: int, lengths=None, micro: int = 1) -> np.ndarray:
    """Steps 1-3 of canonical.py's docstring for one stream, written out with numpy's generators: the
    reference the one implementation is held to (the order before canonical streams, bit for bit)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    windows, held = [[]], 0
    for shard in np.random.default_rng([seed, epoch]).permutation(len(sizes)).tolist():  # 1. shards by (seed, epoch)
        if held >= max(window, 1):  # 2. windows of at least `window` samples
            windows, held = windows + [[]], 0
        windows[-1].append(shard)
        held += sizes[shard]
    out, lo = [], 0
    for index, shards in enumerate(windows):  # 3. each window permuted by (seed, epoch, window)
        members = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards])
        perm = (np.random.default_rng([seed, epoch, index, 1]).permutation(len(members)) if lengths is None
                else order.bucketed_window_permutation(lengths[members], seed, epoch, index, lo, micro))
        out.append(members[perm])
        lo += len(members)
    return np.concatenate(out)


# Shards of 3, 2, 4 and 1 samples, seed 7, epoch 0, windows of at least 4, micro-batches of 2: the
# shards are read 0, 2, 1, 3, so window 0 holds positions 0-2 and 5-8, window 1 positions 3-4 and 9.
EXPECTED_PLAIN = [1, 0, 8, 7, 5, 6, 2, 3, 9, 4]
# Bucketed by the lengths 5 1 9 2 8 3 7 4 6 5 (by position): window 0's grid pieces get lengths (7 9) (5 6) (1 3) (4),
# runs of its sorted lengths; window 1's (2) (5 8).
EXPECTED_BUCKETED = [6, 2, 0, 8, 1, 5, 7, 3, 9, 4]
EXPECTED_TWO_STREAMS = [1, 5, 7, 3, 6, 0, 8, 4]  # S = 2: the whole global batches only, chunk c from stream c mod 2


def test_one_stream_of_a_tiny_split_is_this_order():
    """The pin: shards of 3, 2, 4 and 1 samples (split positions 0-2, 3-4, 5-8, 9), windows of 4."""
    layout = BatchLayout(4, 2, 1)
    lengths = np.array([5, 1, 9, 2, 8, 3, 7, 4, 6, 5])
    assert canonical.epoch_sequence([3, 2, 4, 1], None, 7, 0, 4, layout).tolist() == EXPECTED_PLAIN
    assert canonical.epoch_sequence([3, 2, 4, 1], lengths, 7, 0, 4, layout).tolist() == EXPECTED_BUCKETED
    assert canonical.epoch_sequence([3, 2, 4, 1], None, 7, 0, 4, layout, 2).tolist() == EXPECTED_TWO_STREAMS
    assert _plain_order([3, 2, 4, 1], 7, 0, 4).tolist() == EXPECTED_PLAIN
    assert _plain_order([3, 2, 4, 1], 7, 0, 4, lengths, 2).tolist() == EXPECTED_BUCKETED


@pytest.mark.parametrize("epoch", [0, 5])
def test_one_stream_is_the_plain_order(epoch):
    layout = BatchLayout(256, 32, 1)
    np.testing.assert_array_equal(canonical.epoch_sequence(SIZES, None, 7, epoch, 1000, layout, 1),
                                  _plain_order(SIZES, 7, epoch, 1000))
    np.testing.assert_array_equal(canonical.epoch_sequence(SIZES, LENGTHS, 7, epoch, 1000, layout, 1),
                                  _plain_order(SIZES, 7, epoch, 1000, LENGTHS, 32))
    assert canonical.steps_in_epoch(sum(SIZES), 256, 1) == sum(SIZES) // 256
    assert canonical.steps_in_epoch(sum(SIZES), 256) == sum(SIZES) // 256  # one stream, the default


def test_one_stream_is_the_plain_order_for_any_split_and_window():
    rng = np.random.default_rng(11)
    for case in range(60):
        sizes = rng.integers(1, 90, rng.integers(1, 12)).tolist()
        lengths = rng.integers(1, rng.integers(2, 40), sum(sizes))
        window, micro = int(rng.integers(0, 300)), int(rng.choice([1, 3, 16]))
        layout = BatchLayout(micro, micro, 1)
        np.testing.assert_array_equal(canonical.epoch_sequence(sizes, None, case, 2, window, layout),
                                      _plain_order(sizes, case, 2, window))
        np.testing.assert_array_equal(canonical.epoch_sequence(sizes, lengths, case, 2, window, layout),
                                      _plain_order(sizes, case, 2, window, lengths, micro))


def test_a_global_batch_larger_than_the_split_is_refused_with_the_numbers():
    assert canonical.steps_in_epoch(256, 256) == 1 and canonical.steps_in_epoch(511, 256) == 1
    with pytest.raises(ConfigError, match=r"global_batch_size 256 is larger than the train split \(255 samples\): "):
        canonical.steps_in_epoch(255, 256)
    with pytest.raises(ConfigError, match=r"\(1000 samples in 8 canonical streams\)"):
        canonical.steps_in_epoch(1000, 1024, 8)


@pytest.mark.parametrize("streams", [2, 4, 8])
def test_streams_cover_the_epoch_once_with_an_equal_share_per_global_batch(streams):
    layout = BatchLayout(256, 32, 1)
    sequence = canonical.epoch_sequence(SIZES, None, 7, 0, 1000, layout, streams)
    steps = canonical.steps_in_epoch(sum(SIZES), 256, streams)
    assert len(sequence) == steps * 256 == len(np.unique(sequence))
    pieces = canonical.stream_pieces(SIZES, 7, 0, streams)
    offsets = order.shard_offsets(SIZES)
    stream_of = np.empty(sum(SIZES), np.int64)
    for s, parts in enumerate(pieces):
        for shard, a, b in parts:
            stream_of[offsets[shard] + a:offsets[shard] + b] = s
    sizes = [sum(b - a for _, a, b in parts) for parts in pieces]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(SIZES)
    for k in range(steps):  # every global batch: G / S samples of each stream, chunk c from stream c mod S
        chunks = stream_of[sequence[k * 256:(k + 1) * 256]].reshape(-1, 32)
        assert (chunks == (np.arange(len(chunks)) % streams)[:, None]).all()


@pytest.mark.parametrize("streams,world,touched", [(8, 1, 8), (8, 2, 4), (8, 4, 2), (8, 8, 1), (4, 8, 1), (6, 4, 3)])
def test_a_rank_touches_its_share_of_the_streams(streams, world, touched):
    layout = BatchLayout.make(48 * 8, 8, world) if streams == 6 else BatchLayout.make(256, 32 // max(1, world // 8), world)
    canonical.check_streams(layout, streams)
    assert len(set(canonical.rank_streams(layout, streams, 0))) == touched


def test_a_count_that_does_not_divide_the_micro_batches_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"canonical_streams 3 does not divide the 4 micro-batches.*1, 2, 4"):
        canonical.check_streams(BatchLayout(256, 64, 1), 3)


def test_bucketing_inside_streams_keeps_the_padding_low():
    layout = BatchLayout(256, 32, 1)
    random = order.epoch_padding_waste(canonical.epoch_sequence(SIZES, None, 7, 0, 1000, layout, 8), LENGTHS, layout)
    for streams in (1, 8):
        bucketed = canonical.epoch_sequence(SIZES, LENGTHS, 7, 0, 1000, layout, streams)
        assert order.epoch_padding_waste(bucketed, LENGTHS, layout) < random / 5
