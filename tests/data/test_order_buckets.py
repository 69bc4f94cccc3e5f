"""Length-bucketed order (order.bucketed_window_permutation, in canonical.epoch_sequence): each
micro-batch holds samples of similar length, and it is still one global order, a pure function of
the data's shard sizes and lengths, whatever the world size.

Pure numpy, no data read but the real FSDD lengths (3000 spoken digits, 6..92 frames).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import canonical, order
from pipeline.data.order import BatchLayout

SEED, EPOCH = 7, 3


def _random_split(rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """Shard sizes of arbitrary sizes (windows then start and end off the chunk grid) and lengths with ties."""
    sizes = rng.integers(1, 90, rng.integers(1, 12)).tolist()
    return sizes, rng.integers(1, rng.integers(2, 40), sum(sizes))


def _sequence(sizes: list[int], lengths: np.ndarray | None, seed: int, epoch: int, window: int, micro: int) -> np.ndarray:
    """The epoch's order (one canonical stream), bucketed by `lengths` unless None."""
    return canonical.epoch_sequence(sizes, lengths, seed, epoch, window, BatchLayout(micro, micro, 1))


def _window_spans(sizes: list[int], seed: int, epoch: int, window: int) -> list[tuple[int, int]]:
    """(first, end sequence position) of each of the epoch's windows."""
    return [(unit.lo, unit.lo + unit.size) for unit in canonical.epoch_units(sizes, seed, epoch, window, 1)]


@pytest.fixture(scope="module")
def fsdd_lengths(examples) -> np.ndarray:
    lengths = np.load(examples / "fsdd" / "digits.npz")["lengths"]
    assert lengths.shape == (3000,) and lengths.min() >= 1
    return lengths


@pytest.mark.parametrize("micro", [1, 2, 3, 7, 16, 32, 64, 100])
def test_a_bucketed_window_is_a_permutation_of_the_window_at_any_offset_and_size(micro):
    rng = np.random.default_rng(micro)
    for _ in range(200):
        size = int(rng.integers(0, 3 * micro + 5))  # windows smaller than m, several chunks, empty
        lo = int(rng.integers(0, 5 * micro + 3))  # off the grid as often as on it
        lengths = rng.integers(1, 30, size)
        perm = order.bucketed_window_permutation(lengths, SEED, EPOCH, 4, lo, micro)
        assert np.array_equal(np.sort(perm), np.arange(size))
        assert order.window_segments(lo, size, micro).sum() == size


@pytest.mark.parametrize("micro", [1, 3, 16, 32, 64])
def test_a_bucketed_epoch_keeps_every_window_s_samples_and_uses_every_sample_once(micro):
    rng = np.random.default_rng(100 + micro)
    for _ in range(30):
        sizes, lengths = _random_split(rng)
        window = int(rng.integers(1, 300))
        seq = _sequence(sizes, lengths, SEED, EPOCH, window, micro)
        plain = _sequence(sizes, None, SEED, EPOCH, window, micro)
        assert np.array_equal(np.sort(seq), np.arange(sum(sizes)))
        # Bucketing only rearranges inside a window: the stream still reads window by window.
        for lo, hi in _window_spans(sizes, SEED, EPOCH, window):
            assert np.array_equal(np.sort(seq[lo:hi]), np.sort(plain[lo:hi]))


@pytest.mark.parametrize("micro", [2, 5, 16])
def test_the_grid_pieces_of_a_window_hold_runs_of_its_length_order(micro):
    """Within a window, every chunk's piece is a run of the window's samples sorted by length: the
    length ranges of two pieces never overlap (they may touch where lengths tie)."""
    rng = np.random.default_rng(micro)
    for _ in range(50):
        size, lo = int(rng.integers(1, 12 * micro)), int(rng.integers(0, 4 * micro))
        lengths = rng.integers(1, 1000, size)
        laid = lengths[order.bucketed_window_permutation(lengths, SEED, EPOCH, 0, lo, micro)]
        bounds = np.cumsum(order.window_segments(lo, size, micro))[:-1]
        ranges = sorted((p.min(), p.max()) for p in np.split(laid, bounds))
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        pieces = np.split(np.arange(lo, lo + size), bounds)
        assert all(len(set((p // micro).tolist())) == 1 for p in pieces)  # each piece inside one chunk


def test_the_bucketed_order_is_a_pure_function_of_seed_and_epoch():
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 120, 10).tolist()
    lengths = rng.integers(5, 90, sum(sizes))
    first = _sequence(sizes, lengths, SEED, EPOCH, 256, 16)
    assert np.array_equal(first, _sequence(list(sizes), lengths.copy(), SEED, EPOCH, 256, 16))
    assert not np.array_equal(first, _sequence(sizes, lengths, SEED + 1, EPOCH, 256, 16))
    assert not np.array_equal(first, _sequence(sizes, lengths, SEED, EPOCH + 1, 256, 16))
    # The chunks themselves change with the seed, not only their places: other micro-batches each epoch.
    chunks = {frozenset(c.tolist()) for c in first[:len(first) // 16 * 16].reshape(-1, 16)}
    other = _sequence(sizes, lengths, SEED, EPOCH + 1, 256, 16)
    assert chunks != {frozenset(c.tolist()) for c in other[:len(other) // 16 * 16].reshape(-1, 16)}


def test_with_all_lengths_equal_the_bucketed_order_is_the_published_one():
    rng = np.random.default_rng(1)
    for micro in (1, 16, 64):
        sizes, _ = _random_split(rng)
        same = np.full(sum(sizes), 17)
        assert np.array_equal(_sequence(sizes, same, SEED, EPOCH, 100, micro), _sequence(sizes, None, SEED, EPOCH, 100, micro))


def test_the_micro_batches_are_the_same_at_every_world_size_for_stream_and_resident():
    """W=1 x A=4, W=2 x A=2, W=4 x A=1: the same chunks, as ordered lists, from the resident path
    (the epoch's sequence, then micro_positions) and from the stream's (per window: the bucketed
    permutation, then the rank's positions, canonical.rank_keeps). The order takes no world size at all."""
    rng = np.random.default_rng(2)
    sizes, window, micro, global_batch = rng.integers(30, 200, 14).tolist(), 333, 16, 64
    lengths = rng.integers(3, 95, sum(sizes))
    seq = canonical.epoch_sequence(sizes, lengths, SEED, EPOCH, window, BatchLayout(global_batch, micro, 1))
    offsets = order.shard_offsets(sizes)
    steps = canonical.steps_in_epoch(len(seq), global_batch)
    seen = []
    for world in (1, 2, 4):
        layout = BatchLayout.make(global_batch, micro, world)
        chunks: dict[tuple[int, int], list[int]] = {}
        for rank in range(world):
            resident = []
            for step in range(steps):
                for a in range(layout.accumulation):
                    rows = seq[order.micro_positions(layout, rank, step, a)]
                    chunks[(step, order.chunk_index(layout, rank, a))] = rows.tolist()
                    resident.append(rows)
            streamed = []
            for unit in canonical.epoch_units(sizes, SEED, EPOCH, window, 1):
                positions = np.arange(unit.lo, unit.lo + unit.size)
                keep = canonical.rank_keeps(layout, 1, 0, positions, rank) & (positions < steps * global_batch)
                members = canonical.unit_members(unit, offsets)
                streamed.append(members[canonical.unit_permutation(unit, lengths[members], SEED, EPOCH, micro)][keep])
            assert np.array_equal(np.concatenate(streamed), np.concatenate(resident))
        assert len(chunks) == steps * layout.chunks
        seen.append(chunks)
    assert seen[0] == seen[1] == seen[2]
    assert {k: frozenset(v) for k, v in seen[0].items()} == {k: frozenset(v) for k, v in seen[1].items()}


def _waste(sizes, lengths, micro, bucketed: bool) -> list[float]:
    layout = BatchLayout.make(8 * micro, micro, 1)
    out = []
    for seed in range(3):
        for epoch in range(3):
            seq = _sequence(sizes, lengths if bucketed else None, seed, epoch, 1024, micro)
            out.append(order.epoch_padding_waste(seq, lengths, layout))
    return out


@pytest.mark.parametrize("micro", [16, 32, 64])
def test_bucketing_cuts_the_padding_of_real_spoken_digits(fsdd_lengths, micro):
    """FSDD in 12 shards of 250, windows of 1024 (so of 1250: off the grid), 3 seeds x 3 epochs.
    The teeth: the unbucketed order pads most of the compute, and bucketing must cut it severalfold;
    a bucketing that silently returned the plain permutation fails here."""
    sizes = [250] * 12
    plain, bucketed = _waste(sizes, fsdd_lengths, micro, False), _waste(sizes, fsdd_lengths, micro, True)
    print(f"m={micro}: padding waste random {np.mean(plain):.3f} (max {max(plain):.3f}), "
          f"bucketed {np.mean(bucketed):.3f} (max {max(bucketed):.3f})")
    assert min(plain) > 0.5  # random chunks of FSDD: at least half as many padded steps as real ones
    assert max(bucketed) < min(plain) / 4
    assert max(bucketed) < 0.3


def test_padding_waste_counts_padded_steps_per_real_step():
    assert order.padding_waste([np.array([2, 2]), np.array([5])]) == 0.0
    assert order.padding_waste(np.array([[1, 3], [4, 4]])) == pytest.approx(2 / 12)
    assert order.padding_waste([]) == 0.0
