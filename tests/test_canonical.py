"""Canonical streams as pure functions: one stream is exactly the order before streams; S streams
cover the epoch once, give every global batch an equal share of each stream, and a rank of W
(W dividing S) touches only S / W of them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import canonical, order
from pipeline.data.order import BatchLayout
from pipeline.errors import ConfigError

RNG = np.random.default_rng(3)
SIZES = [int(n) for n in RNG.integers(40, 400, size=41)]
LENGTHS = RNG.integers(3, 200, size=sum(SIZES))


@pytest.mark.parametrize("epoch", [0, 5])
def test_one_stream_is_the_order_before_streams(epoch):
    layout = BatchLayout(256, 32, 1)
    np.testing.assert_array_equal(canonical.epoch_sequence(SIZES, None, 7, epoch, 1000, layout, 1),
                                  order.epoch_order(SIZES, 7, epoch, 1000))
    np.testing.assert_array_equal(canonical.epoch_sequence(SIZES, LENGTHS, 7, epoch, 1000, layout, 1),
                                  order.bucketed_epoch_order(SIZES, LENGTHS, 7, epoch, 1000, 32))
    assert canonical.steps_in_epoch(sum(SIZES), 256, 1) == sum(SIZES) // 256


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
