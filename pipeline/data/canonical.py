"""The epoch's order of samples, in one implementation (`epoch_sequence`): one global sequence per
epoch, whatever the world size, cut into S canonical streams so that a rank reads only its share.

Pure functions of the shard sizes (and, bucketed, the lengths), the seed, the epoch and the batch
layout, put together from order.py's parts. With S = 1 (the default) it is the plain order:
1. the shards are permuted with a generator seeded by (seed, epoch) (`order.shard_permutation`);
2. consecutive shards of that permutation form windows of at least `window` samples
   (`data.shuffle_buffer`, `order.group_windows`), numbered in reading order;
3. each window's samples are permuted with a generator seeded by (seed, epoch, window number)
   (`order.window_permutation`), or laid out by length (`order.bucketed_window_permutation`);
4. global batch k is positions [kG, (k+1)G) of that sequence; the last, partial one is dropped.

With S streams, the run of samples of step 1, shard after shard, is cut into S contiguous
streams of nearly equal size (split positions, so a shard at a boundary is shared by two streams
as two pieces); each stream forms its own windows from its pieces (step 2, numbered across
streams, stream 0's first) and permutes each by its number (step 3, on the stream's own grid of
micro-batches); global batch k takes G/S consecutive samples of every stream: micro-batch
(chunk) c of the global batch comes from stream c mod S, its (c div S)-th run of m in that slice.

Rank r computes chunks a*W + r (order.py), so it reads streams (a*W + r) mod S: when W divides S,
only S/W of them. The global batches depend on S and never on W (the chunks' assignment to
streams depends on m, which the length buckets depend on already), so every world size dividing
G/m trains on the same batches; S itself is fixed for a run (checkpointed with the order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data import order
from pipeline.data.order import BatchLayout
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Unit:
    """One window of one stream: what a reader reads and permutes as a whole."""

    stream: int
    index: int  # the window's number in the epoch (the key of its permutation)
    pieces: tuple[tuple[int, int, int], ...]  # (shard, first sample, end sample) in reading order
    lo: int  # its first position in the stream's sequence
    size: int


def check_streams(layout: BatchLayout, streams: int) -> None:
    """S must cut every global batch into whole micro-batches per stream: S divides G / m."""
    if streams < 1 or layout.chunks % streams:
        fits = [s for s in range(1, layout.chunks + 1) if layout.chunks % s == 0]
        raise ConfigError(
            f"data.canonical_streams {streams} does not divide the {layout.chunks} micro-batches of a global batch "
            f"({layout.global_batch} / train.batch_size {layout.micro_batch}): each stream gives every global batch "
            f"whole micro-batches. Use one of {', '.join(map(str, fits))}, or change train.batch_size")


def stream_bounds(total: int, streams: int) -> np.ndarray:
    return np.array([total * s // streams for s in range(streams + 1)], dtype=np.int64)


def steps_in_epoch(num_samples: int, global_batch: int, streams: int = 1) -> int:
    """Whole global batches every stream can fill (each gives a global batch G / S samples): with one
    stream, N div G. ConfigError when not one fits."""
    shortest = int(np.diff(stream_bounds(num_samples, streams)).min())
    steps = shortest // (global_batch // streams)
    if steps == 0:
        where = "" if streams == 1 else f" in {streams} canonical streams"
        raise ConfigError(f"train.global_batch_size {global_batch} is larger than the train split ({num_samples} "
                          f"samples{where}): not one step fits in an epoch")
    return steps


def stream_pieces(shard_sizes: list[int], seed: int, epoch: int, streams: int) -> list[list[tuple[int, int, int]]]:
    """Each stream's pieces of shards, (shard, first, end), in reading order."""
    permuted = order.shard_permutation(len(shard_sizes), seed, epoch)
    bounds = stream_bounds(sum(shard_sizes), streams)
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(streams)]
    at, s = 0, 0
    for shard in permuted.tolist():
        first, size = 0, shard_sizes[shard]
        while first < size:
            while at >= bounds[s + 1]:
                s += 1
            take = min(size - first, int(bounds[s + 1]) - at)
            out[s].append((shard, first, first + take))
            first, at = first + take, at + take
    return out


def epoch_units(shard_sizes: list[int], seed: int, epoch: int, window: int, streams: int) -> list[Unit]:
    """Every stream's windows (steps 1-2 of the module's docstring), stream by stream, numbered across them."""
    units: list[Unit] = []
    for s, pieces in enumerate(stream_pieces(shard_sizes, seed, epoch, streams)):
        sizes, lo = [b - a for _, a, b in pieces], 0
        for group in order.group_windows(sizes, window):
            if group:  # a stream without pieces (more streams than samples) has no window
                size = sum(sizes[i] for i in group)
                units.append(Unit(s, len(units), tuple(pieces[i] for i in group), lo, size))
                lo += size
    return units


def unit_members(unit: Unit, offsets: np.ndarray) -> np.ndarray:
    """The unit's split positions in reading order, before its permutation."""
    return np.concatenate([np.arange(offsets[s] + a, offsets[s] + b) for s, a, b in unit.pieces])


def unit_permutation(unit: Unit, lengths: np.ndarray | None, seed: int, epoch: int, micro_batch: int) -> np.ndarray:
    """The order of the unit's members: bucketed by length when `lengths` (the members') is given."""
    if lengths is not None:
        return order.bucketed_window_permutation(lengths, seed, epoch, unit.index, unit.lo, micro_batch)
    return order.window_permutation(seed, epoch, unit.index, unit.size)


def global_positions(layout: BatchLayout, streams: int, stream: int, q: np.ndarray) -> np.ndarray:
    """The epoch-sequence positions of stream positions `q` of `stream` (step 4 of the module's docstring)."""
    per, m = layout.global_batch // streams, layout.micro_batch
    q = np.asarray(q, dtype=np.int64)
    step, inside = q // per, q % per
    chunk = inside // m * streams + stream
    return step * layout.global_batch + chunk * m + inside % m


def epoch_sequence(shard_sizes: list[int], lengths: np.ndarray | None, seed: int, epoch: int, window: int,
                   layout: BatchLayout, streams: int = 1) -> np.ndarray:
    """The epoch's sequence of split positions (global batch k at [kG, (k+1)G)); `lengths` (by split
    position) buckets each window by length. S = 1: the plain order (the whole split, steps 1-3), the
    default; S > 1: only the epoch's whole global batches."""
    check_streams(layout, streams)
    offsets = order.shard_offsets(shard_sizes)
    per_stream: list[list[np.ndarray]] = [[] for _ in range(streams)]
    for unit in epoch_units(shard_sizes, seed, epoch, window, streams):
        members = unit_members(unit, offsets)
        mine = None if lengths is None else np.asarray(lengths)[members]
        per_stream[unit.stream].append(members[unit_permutation(unit, mine, seed, epoch, layout.micro_batch)])
    orders = [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in per_stream]
    if streams == 1:
        return orders[0]
    steps = steps_in_epoch(sum(shard_sizes), layout.global_batch, streams)
    used = steps * (layout.global_batch // streams)
    sequence = np.empty(steps * layout.global_batch, dtype=np.int64)
    for s, stream_order in enumerate(orders):
        sequence[global_positions(layout, streams, s, np.arange(used))] = stream_order[:used]
    return sequence


def rank_streams(layout: BatchLayout, streams: int, rank: int) -> list[int]:
    """The stream of each of this rank's micro-batches, in accumulation order (the same every step)."""
    return [order.chunk_index(layout, rank, a) % streams for a in range(layout.accumulation)]


def rank_keeps(layout: BatchLayout, streams: int, stream: int, q: np.ndarray, rank: int) -> np.ndarray:
    """Which stream positions `q` of `stream` fall in this rank's micro-batches."""
    chunk = global_positions(layout, streams, stream, q) % layout.global_batch // layout.micro_batch
    return chunk % layout.world_size == rank
