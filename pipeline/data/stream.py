"""Manifest -> this rank's micro-batches, read through DataLoader workers, in the global order.

The order is pipeline/data/order.py's: the epoch's shards in windows, each window's samples
permuted, global batch k at positions [kG, (k+1)G) of that sequence, and this rank's chunks of
each. Loader workers take whole windows in turn (the j-th window from the start goes to worker
j mod workers): a worker reads the window's shards, puts their samples in the window's order,
keeps those at this rank's positions, augments them (keyed on the sample id) and hands them over
as one item; the rank's process puts the items back in window order and cuts its micro-batches
(batches.py). The batches are therefore the same for any number of workers, and the same as the
resident ones. Every rank reads every shard of the epoch (one pass over the packed split per
rank and epoch: a tenth of a second for Fashion-MNIST). A resumed epoch skips every window that
ends before its first sample, unread. Workers persist across epochs; the epoch and the starting
step reach them through shared memory.
"""

from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import order, ragged
from pipeline.data.augment import Augment
from pipeline.data.manifest import Manifest, ShardEntry
from pipeline.data.order import BatchLayout
from pipeline.data.remote import PipeShard, ShardSourceError, backoff, is_http, open_remote, probe_sizes
from pipeline.data.shards import Block, iter_tar_blocks
from pipeline.errors import DataError
from pipeline.files import mask_url, sha256_file, sha256_stream


@dataclass(frozen=True)
class ShardSource:
    """Where shards are read from: a local directory or a base URL (http(s)://, pipe:)."""

    directory: str
    base_url: str | None = None
    retry_s: float | None = None  # data.retry_s: how long a transient transfer failure is tried again (remote.py)

    def retry_delays(self) -> tuple[float, ...] | None:
        return None if self.retry_s is None else backoff(self.retry_s)

    def location(self, shard: ShardEntry) -> str:
        """Where the shard is read from: with data.base_url, the real URL (credentials and all)."""
        if self.base_url:
            return self.base_url.rstrip("/") + "/" + shard.url
        return str(Path(self.directory) / shard.url)

    def shown(self, shard: ShardEntry) -> str:
        """The location as messages name it: a URL's credentials masked."""
        return mask_url(self.location(shard))

    def open(self, shard: ShardEntry):
        """The shard's bytes; a transfer that fails raises ShardSourceError where it is read (remote.py)."""
        loc = self.location(shard)
        if self.base_url:
            return open_remote(loc, self.retry_delays())
        try:
            return open(loc, "rb")
        except OSError as err:
            raise DataError(f"shard {loc} cannot be opened ({err.strerror}); check data.dir or re-run the preparation") from None


def read_blocks(source: ShardSource, shard: ShardEntry) -> Iterator[Block]:
    read = 0
    with source.open(shard) as stream:
        for _, block in iter_tar_blocks(stream, source.shown(shard)):
            read += len(block)
            yield block
        if isinstance(stream, PipeShard):  # the reader stops at the archive's end: did the command end well too?
            stream.check()
    # tarfile takes a damaged header after the first one for the end of the archive, silently.
    if read != shard.num_samples:
        raise DataError(f"shard {source.shown(shard)} ended after {read} of its {shard.num_samples} samples: "
                        "it is truncated or corrupt; run prepare_data.py --verify on the dataset")


def verify_shards(manifest: Manifest, source: ShardSource, split: str, mode: str) -> None:
    """Fail before training on missing or resized shards ('size'), or on changed bytes ('sha256')."""
    if mode == "none":
        return
    if source.base_url:
        _verify_remote(manifest.split(split).shards, source, mode)
        return
    for shard in manifest.split(split).shards:
        path = Path(source.location(shard))
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing; re-run the preparation with --force")
        if path.stat().st_size != shard.bytes:
            raise DataError(f"shard {path} is {path.stat().st_size} bytes, the manifest says {shard.bytes}; it is damaged")
        if mode == "sha256" and sha256_file(path) != shard.sha256:
            raise DataError(f"shard {path} does not match its sha256 in the manifest; it is damaged")


def _verify_remote(shards: list[ShardEntry], source: ShardSource, mode: str) -> None:
    """The server has every shard, at its size ('size': a HEAD request each, over http(s) only: a pipe's
    size is known only by reading it) or with its bytes ('sha256': each read whole)."""
    if mode == "sha256":
        for shard in shards:
            with source.open(shard) as stream:
                digest = sha256_stream(stream)
            if digest != shard.sha256:
                raise DataError(f"shard {source.shown(shard)} does not match its sha256 in the manifest: the server's "
                                "copy differs from the prepared one; upload the prepared dataset again")
        return
    if not is_http(source.base_url or ""):
        return
    for shard, size in zip(shards, probe_sizes([source.location(s) for s in shards], source.retry_delays()), strict=True):
        if size is not None and size != shard.bytes:
            raise DataError(f"shard {source.shown(shard)} is {size} bytes on the server, the manifest says {shard.bytes}: "
                            "the server's copy differs from the prepared one; upload the prepared dataset again")


@dataclass(frozen=True)
class EpochPlan:
    """What every rank agrees on about an epoch: the layout, the order's seed and window, its steps."""

    layout: BatchLayout
    seed: int
    window: int  # data.shuffle_buffer: samples per window, at least
    steps: int  # global batches per epoch (the same in every epoch)
    length_buckets: bool = False  # micro-batches of similar lengths (order.bucketed_window_permutation)
    ragged: bool = False  # the samples' lengths vary: micro-batches are padded and carry their lengths

    @classmethod
    def make(cls, manifest: Manifest, split: str, layout: BatchLayout, seed: int, window: int,
             length_buckets: bool = True) -> EpochPlan:
        ragged = varying_lengths(manifest)
        return cls(layout, seed, window, order.steps_in_epoch(manifest.split(split).num_samples, layout.global_batch),
                   length_buckets and ragged, ragged)


def varying_lengths(manifest: Manifest) -> bool:
    """Whether the data set's cases differ in length (in any split): then batches are padded and masked."""
    spans = [(s.lengths.min, s.lengths.max) for s in manifest.splits.values()]
    return len({v for span in spans for v in span}) > 1


@dataclass(frozen=True)
class WindowItem:
    """A worker's hand-over: this rank's samples of window `index`, in sequence order."""

    index: int
    x: torch.Tensor  # the samples' steps concatenated [sum of lengths, F], the data set's dtype
    lengths: torch.Tensor  # int64 [n]
    y: torch.Tensor
    ids: torch.Tensor
    skipped: int  # samples of the window's unreadable shards whose places here other samples took (on_error=skip)


class FailureMessage(str):
    """The message of a DataError that ended a worker's stream, with the error's exit code."""

    exit_code: int = 1


class TrainStream(IterableDataset):
    """Yields, for one rank and epoch from a starting step, a WindowItem per window; or a str ending
    the stream: the message of a DataError (bad bytes with on_error="raise"; a failed transfer under
    either setting), as a FailureMessage that keeps its exit code (an exception raised in a
    DataLoader worker reaches the trainer wrapped in the worker's traceback text, which is no
    message for a user). Without workers the error is raised as it is."""

    def __init__(self, manifest: Manifest, source: ShardSource, split: str, plan: EpochPlan, rank: int,
                 augment: Augment, workers: int = 0, on_error: str = "raise"):
        self.shards = manifest.split(split).shards
        self.sizes = [s.num_samples for s in self.shards]
        self.features, self.dtype = manifest.features, np.dtype(manifest.dtype)
        self.workers = workers
        self.source = source
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
            if info is None:  # in the trainer's process: its exit code (75 for a source that may come back) stays
                raise
            message = FailureMessage(str(err))
            message.exit_code = err.exit_code
            yield message

    def _spans(self, epoch: int, start_step: int) -> Iterator[tuple[int, list[int], int, int]]:
        """(window index, its shards, first and end sequence position) of the windows this epoch still needs."""
        first, limit = start_step * self.plan.layout.global_batch, self.plan.steps * self.plan.layout.global_batch
        begin = 0
        for index, shards in enumerate(order.windows(self.sizes, self.plan.seed, epoch, self.plan.window)):
            lo, hi = begin, begin + sum(self.sizes[s] for s in shards)
            begin = hi
            if lo >= limit:
                return
            if hi > first:
                yield index, shards, lo, hi

    def first_window(self, epoch: int, start_step: int) -> int:
        return next(self._spans(epoch, start_step))[0]

    def _windows(self, epoch: int, start_step: int, worker: int, workers: int) -> Iterator[WindowItem]:
        layout = self.plan.layout
        first, limit = start_step * layout.global_batch, self.plan.steps * layout.global_batch
        for j, (index, shards, lo, hi) in enumerate(self._spans(epoch, start_step)):
            if j % workers != worker:  # the j-th window this epoch needs goes to worker j mod workers
                continue
            positions = np.arange(lo, hi)
            keep = order.rank_mask(positions, layout, self.rank) & (positions >= first) & (positions < limit)
            x, lengths, y, ids, skipped = self._read_window(shards, index, epoch, keep, lo)
            yield WindowItem(index, *(torch.from_numpy(a) for a in (x, lengths, y, ids)), skipped)

    def _read_window(self, shards: list[int], index: int, epoch: int, keep: np.ndarray, lo: int):
        """This rank's samples of one window, in sequence order, augmented; and how many were stand-ins."""
        values, lengths, y, ids, readable = self._gather(shards)
        chosen = self._permutation(lengths, readable, epoch, index, lo)[keep]
        skipped = 0
        if not readable.all():  # on_error=skip: an unreadable sample's place goes to the window's readable ones, in turn
            lost = ~readable[chosen]
            good = np.flatnonzero(readable)
            if len(good) == 0:
                names = ", ".join(self.source.shown(self.shards[s]) for s in shards)
                raise DataError(f"none of the shards {names} could be read, and data.on_error=skip has no sample of "
                                f"their window (epoch {epoch}) to stand in for theirs")
            skipped = int(lost.sum())
            chosen = chosen.copy()
            chosen[lost] = good[np.arange(skipped) % len(good)]
        x, kept = ragged.take(values, lengths, chosen)
        if self.augment.active:  # image augmentations: the data set is of one length (config.py checks)
            n = len(chosen)
            x = self.augment.numpy(x.reshape(n, -1, self.features), ids[chosen], epoch).reshape(-1, self.features)
        return x, kept, y[chosen], ids[chosen], skipped

    def _gather(self, shards: list[int]):
        """The window's shards read, in order: values, lengths, labels, ids, and which places were readable
        (an unreadable shard's places keep length 0 and no values: on_error=skip gives them stand-ins)."""
        total = sum(self.sizes[s] for s in shards)
        parts: list[np.ndarray] = []
        lengths, y, ids = np.zeros(total, np.int64), np.zeros(total, np.int64), np.zeros(total, np.int64)
        readable = np.zeros(total, bool)
        at = 0
        for s in shards:
            at_end = at + self.sizes[s]
            for block in self._read_shard(self.shards[s]):
                n = len(block)
                parts.append(block.values)
                lengths[at:at + n], y[at:at + n], ids[at:at + n] = block.lengths, block.labels, block.ids
                readable[at:at + n] = True
                at += n
            at = at_end
        values = np.concatenate(parts) if parts else np.zeros((0, self.features), self.dtype)
        return values, lengths, y, ids, readable

    def _permutation(self, lengths: np.ndarray, readable: np.ndarray, epoch: int, index: int, lo: int) -> np.ndarray:
        """The window's order: by length buckets (data.length_buckets) where lengths vary, else random. An
        unreadable shard's lengths are unknown, so a window that lost one falls back to the random order."""
        plan = self.plan
        if plan.length_buckets and readable.all():
            return order.bucketed_window_permutation(lengths, plan.seed, epoch, index, lo, plan.layout.micro_batch)
        return order.window_permutation(plan.seed, epoch, index, len(lengths))

    def _read_shard(self, shard: ShardEntry) -> Iterator[Block]:
        """Its blocks; with on_error=skip, those read before it failed (the rest are stand-ins' places)."""
        read = 0
        try:
            for block in read_blocks(self.source, shard):
                read += len(block)
                yield block
        except DataError as err:
            # data.on_error=skip is for bad bytes; a source that failed to deliver them ends the run
            if self.on_error == "raise" or isinstance(err, ShardSourceError):
                raise
            if self.rank == 0:  # every rank reads every shard: one of them says so
                print(f"warning: data.on_error=skip: {shard.num_samples - read} samples of {self.source.shown(shard)} "
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


def save_sample_ids(output_dir: Path, rank: int, batches: list[np.ndarray]) -> None:
    """Audit: the sample ids this rank trained on, one row per step, as output_dir/sample_ids/rank-N.npy."""
    (output_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "sample_ids" / f"rank-{rank:05d}.npy", np.stack(batches))


def load_split_arrays(manifest: Manifest, source: ShardSource, split: str) -> tuple[np.ndarray, ...]:
    """The whole split in memory, in manifest order, padded: (x [n, longest, F] in the data set's dtype,
    lengths int64 [n], labels int64 [n], sample ids int64 [n])."""
    parts: list[np.ndarray] = []
    lengths, ys, ids = [], [], []
    for shard in manifest.split(split).shards:
        for block in read_blocks(source, shard):
            parts.append(block.values)
            lengths.append(block.lengths)
            ys.append(block.labels.astype(np.int64))
            ids.append(block.ids.astype(np.int64))
    lengths_all = np.concatenate(lengths)
    x = ragged.pad(torch.from_numpy(np.concatenate(parts)), torch.from_numpy(lengths_all)).numpy()
    return x, lengths_all, np.concatenate(ys), np.concatenate(ids)


def load_split_tensors(manifest: Manifest, source: ShardSource, split: str) -> tuple[torch.Tensor, ...]:
    """Cases padded [n, longest, F], lengths and labels of the whole split (evaluation)."""
    x, lengths, y, _ = load_split_arrays(manifest, source, split)
    return torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(y)
