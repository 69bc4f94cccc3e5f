"""Manifest -> this rank's micro-batches, read through DataLoader workers, in the global order.

The order is pipeline/data/canonical.py's (order.py's with one stream): the epoch's shards in
windows, each window's samples permuted, global batch k at positions [kG, (k+1)G) of that
sequence, and this rank's chunks of each. Loader workers take whole windows in turn (the j-th
window from the start goes to worker j mod workers): a worker reads the window's shards, puts their samples in the window's order,
keeps those at this rank's positions, augments them (keyed on the sample id) and hands them over
as one item; the rank's process puts the items back in window order and cuts its micro-batches
(batches.py). The batches are therefore the same for any number of workers, and the same as the
resident ones. With one canonical stream every rank reads every shard of the epoch (one pass over
the packed split per rank and epoch: a tenth of a second for Fashion-MNIST); with S streams
(canonical.py) a rank reads the windows of its streams only, pieces of shards where a stream
boundary cuts one. A resumed epoch skips every window that ends before its first sample, unread.
Workers persist across epochs; the epoch and the starting step reach them through shared memory.
"""

from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import canonical, ragged
from pipeline.data.augment import Augment
from pipeline.data.epoch_plan import EpochPlan
from pipeline.data.manifest import Manifest, ShardEntry
from pipeline.data.remote import ShardStoreError
from pipeline.data.shards import Block
from pipeline.data.store import ShardStore, read_blocks
from pipeline.errors import DataError


@dataclass(frozen=True)
class WindowItem:
    """A worker's hand-over: this rank's samples of one window of a canonical stream, in sequence order."""

    index: int  # the window's place in the rank's reading order this epoch (from its first step)
    stream: int
    x: torch.Tensor  # the samples' steps concatenated [sum of lengths, F], the data set's dtype
    lengths: torch.Tensor  # int64 [n]
    y: torch.Tensor
    ids: torch.Tensor
    skipped: int  # samples of the window's unreadable shards whose places here other samples took (on_error=skip)
    bytes_read: int = 0  # of shards, to read this window


class FailureMessage(str):
    """The message of a DataError that ended a worker's stream, with the error's exit code."""

    exit_code: int = 1


class TrainStream(IterableDataset):
    """Yields, for one rank and epoch from a starting step, a WindowItem per window; or a str ending
    the stream: the message of a DataError (bad bytes with on_error="raise"; a failed transfer under
    either setting), as a FailureMessage that keeps its exit code (an exception raised in a
    DataLoader worker reaches the trainer wrapped in the worker's traceback text, which is no
    message for a user). Without workers the error is raised as it is."""

    def __init__(self, manifest: Manifest, store: ShardStore, split: str, plan: EpochPlan, rank: int,
                 augment: Augment, workers: int = 0, on_error: str = "raise"):
        self.shards = manifest.split(split).shards
        self.sizes = [s.num_samples for s in self.shards]
        self.features, self.dtype = manifest.features, np.dtype(manifest.dtype)
        self.workers = workers
        self.store = store
        self.plan = plan
        self.rank = rank
        self.augment = augment
        self.on_error = on_error
        # Shared memory: persistent DataLoader workers hold their own copy of this object.
        self._epoch = multiprocessing.RawValue("q", 0)
        self._start = multiprocessing.RawValue("q", 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch.value = epoch
        self._start.value = start_step

    def __iter__(self) -> Iterator[WindowItem | str]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from self._windows(self._epoch.value, self._start.value, worker, workers)
        except DataError as err:
            if info is None:  # in the trainer's process: its exit code (75 for a store that may come back) stays
                raise
            message = FailureMessage(str(err))
            message.exit_code = err.exit_code
            yield message

    def units(self, epoch: int, start_step: int) -> list[canonical.Unit]:
        """The windows of this rank's streams that the epoch still needs, in the order it first needs them."""
        plan, layout = self.plan, self.plan.layout
        per = layout.global_batch // plan.streams
        first, limit = start_step * per, plan.steps * per  # stream positions
        mine = set(canonical.rank_streams(layout, plan.streams, self.rank))
        needed = [u for u in canonical.epoch_units(self.sizes, plan.seed, epoch, plan.window, plan.streams)
                  if u.stream in mine and u.lo < limit and u.lo + u.size > first]
        return sorted(needed, key=lambda u: int(canonical.global_positions(layout, plan.streams, u.stream,
                                                                           max(u.lo, first))))

    def _windows(self, epoch: int, start_step: int, worker: int, workers: int) -> Iterator[WindowItem]:
        plan = self.plan
        per = plan.layout.global_batch // plan.streams
        first, limit = start_step * per, plan.steps * per
        for j, unit in enumerate(self.units(epoch, start_step)):
            if j % workers != worker:  # the j-th window this rank needs goes to worker j mod workers
                continue
            q = np.arange(unit.lo, unit.lo + unit.size)
            keep = canonical.rank_keeps(plan.layout, plan.streams, unit.stream, q, self.rank) & (q >= first) & (q < limit)
            tally = [0]
            x, lengths, y, ids, skipped = self._read_window(unit, epoch, keep, tally)
            yield WindowItem(j, unit.stream, *(torch.from_numpy(a) for a in (x, lengths, y, ids)), skipped, tally[0])

    def _read_window(self, unit: canonical.Unit, epoch: int, keep: np.ndarray, tally: list[int]):
        """This rank's samples of one window, in sequence order, augmented; and how many were stand-ins."""
        values, lengths, y, ids, readable = self._gather(unit, tally)
        window_order = self._permutation(unit, lengths, readable, epoch)
        skipped = 0
        if not readable.all():
            # on_error=skip: an unreadable sample's place goes to the window's readable ones, in turn, over
            # the whole window before this rank keeps its places: the stand-ins do not depend on the world size.
            lost = ~readable[window_order]
            good = np.flatnonzero(readable)
            if len(good) == 0:
                names = ", ".join(self.store.shown(self.shards[s]) for s, _, _ in unit.pieces)
                raise DataError(f"none of the shards {names} could be read, and data.on_error=skip has no sample of "
                                f"their window (epoch {epoch}) to stand in for theirs")
            window_order = window_order.copy()
            window_order[lost] = good[np.arange(int(lost.sum())) % len(good)]
            skipped = int(lost[keep].sum())
        chosen = window_order[keep]
        x, kept = ragged.take(values, lengths, chosen)
        if self.augment.active:  # image augmentations: the data set is of one length (config.py checks)
            n = len(chosen)
            x = self.augment.numpy(x.reshape(n, -1, self.features), ids[chosen], epoch).reshape(-1, self.features)
        return x, kept, y[chosen], ids[chosen], skipped

    def _gather(self, unit: canonical.Unit, tally: list[int]):
        """The window's pieces of shards read, in order: values, lengths, labels, ids, and which places were
        readable (an unreadable shard's places keep length 0 and no values: on_error=skip gives them stand-ins).
        A piece that ends before its shard does stops reading there; one that reaches the shard's end reads
        it to the end, so the shard's own checks (its sample count, a pipe's exit status) still run."""
        parts: list[np.ndarray] = []
        lengths, y, ids = np.zeros(unit.size, np.int64), np.zeros(unit.size, np.int64), np.zeros(unit.size, np.int64)
        readable = np.zeros(unit.size, bool)
        at = 0
        for shard, begin, end in unit.pieces:
            seen = 0  # samples of the shard before this block
            for block in self._read_shard(self.shards[shard], tally):
                lo, hi = max(begin - seen, 0), min(end - seen, len(block))  # the piece's rows of this block
                if lo < hi:
                    block_ends = np.cumsum(block.lengths)
                    parts.append(block.values[(block_ends[lo - 1] if lo else 0):block_ends[hi - 1]])
                    sl = slice(at + seen + lo - begin, at + seen + hi - begin)
                    lengths[sl], y[sl], ids[sl] = block.lengths[lo:hi], block.labels[lo:hi], block.ids[lo:hi]
                    readable[sl] = True
                seen += len(block)
                if end < self.sizes[shard] and seen >= end:
                    break
            at += end - begin
        values = np.concatenate(parts) if parts else np.zeros((0, self.features), self.dtype)
        return values, lengths, y, ids, readable

    def _permutation(self, unit: canonical.Unit, lengths: np.ndarray, readable: np.ndarray, epoch: int) -> np.ndarray:
        """The window's order: by length buckets (data.length_buckets) where lengths vary, else random. An
        unreadable shard's lengths are unknown, so a window that lost one falls back to the random order."""
        plan = self.plan
        bucketed = lengths if plan.length_buckets and readable.all() else None
        return canonical.unit_permutation(unit, bucketed, plan.seed, epoch, plan.layout.micro_batch)

    def _read_shard(self, shard: ShardEntry, tally: list[int]) -> Iterator[Block]:
        """Its blocks; with on_error=skip, those read before it failed (the rest are stand-ins' places)."""
        read = 0
        try:
            for block in read_blocks(self.store, shard, tally):
                read += len(block)
                yield block
        except DataError as err:
            # data.on_error=skip is for bad bytes; a store that failed to deliver them ends the run
            if self.on_error == "raise" or isinstance(err, ShardStoreError):
                raise
            if self.rank == 0 or self.plan.streams > 1:  # with one stream every rank reads every shard: one says so
                print(f"warning: data.on_error=skip: {shard.num_samples - read} samples of {self.store.shown(shard)} "
                      f"skipped ({err})", file=sys.stderr, flush=True)


def make_train_loader(stream: TrainStream, pin_memory: bool) -> DataLoader:
    # batch_size=None: the stream hands over whole windows; the loader only runs workers. Workers
    # persist: starting them again every epoch cost as much as the epoch's tail.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.workers,
        pin_memory=pin_memory,
        persistent_workers=stream.workers > 0,
        prefetch_factor=2 if stream.workers else None,
    )
