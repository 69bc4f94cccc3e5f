"""Manifest -> this rank's, this worker's batches; the same number of steps on every rank.

Per epoch, the shard list is permuted with a seed shared by all ranks, then split by rank
(round-robin) and by DataLoader worker. Each worker unpacks its blocks into a window,
shuffles the window with a seeded generator and emits full batches, then its remainder as one
partial batch; `merge_partial_batches` in the rank's process joins the workers' partial
batches into full ones, so at most one partial batch per rank is dropped per epoch, whatever
the worker count. The steps of an epoch are the minimum over ranks of full batches, so no rank
waits at an all-reduce that a shorter rank never reaches (webdataset/webdataset#188). Within an
epoch the ranks read disjoint shards, so no training sample is seen twice. Workers persist
across epochs; the epoch reaches them through shared memory.
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

from pipeline.data.manifest import Manifest, ShardEntry
from pipeline.data.shards import iter_tar_blocks
from pipeline.errors import DataError
from pipeline.files import sha256_file


@dataclass(frozen=True)
class ShardSource:
    """Where shards are read from: a local directory or a base URL (http(s)://, pipe:)."""

    directory: str
    base_url: str | None = None

    def location(self, shard: ShardEntry) -> str:
        if self.base_url:
            return self.base_url.rstrip("/") + "/" + shard.url
        return str(Path(self.directory) / shard.url)

    def open(self, shard: ShardEntry):
        loc = self.location(shard)
        if not self.base_url:
            try:
                return open(loc, "rb")
            except OSError as err:
                raise DataError(f"shard {loc} cannot be opened ({err.strerror}); check data.dir or re-run the preparation") from None
        import webdataset as wds

        try:
            return wds.gopen(loc, "rb")
        except Exception as err:  # gopen raises various types for curl/pipe failures
            raise DataError(f"shard {loc} cannot be opened ({err}); check data.base_url") from None


def read_blocks(source: ShardSource, shard: ShardEntry) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    read = 0
    with source.open(shard) as stream:
        for _, x, y, idx in iter_tar_blocks(stream, source.location(shard)):
            read += len(y)
            yield x, y, idx
    # tarfile takes a damaged header after the first one for the end of the archive, silently.
    if read != shard.num_samples:
        raise DataError(f"shard {source.location(shard)} ended after {read} of its {shard.num_samples} samples: "
                        "it is truncated or corrupt; run prepare_data.py --verify on the dataset")


def verify_shards(manifest: Manifest, source: ShardSource, split: str, mode: str) -> None:
    """Fail before training on missing or resized shards ('size'), or on changed bytes ('sha256')."""
    if mode == "none" or source.base_url:
        return
    for shard in manifest.split(split).shards:
        path = Path(source.location(shard))
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing; re-run the preparation with --force")
        if path.stat().st_size != shard.bytes:
            raise DataError(f"shard {path} is {path.stat().st_size} bytes, the manifest says {shard.bytes}; it is damaged")
        if mode == "sha256" and sha256_file(path) != shard.sha256:
            raise DataError(f"shard {path} does not match its sha256 in the manifest; it is damaged")


def epoch_assignment(num_shards: int, seed: int, epoch: int, world_size: int, num_workers: int) -> list[list[list[int]]]:
    """[rank][worker] -> shard indices for one epoch; identical on every rank."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_shards)
    workers = max(1, num_workers)
    return [[perm[r::world_size][w::workers].tolist() for w in range(workers)] for r in range(world_size)]


@dataclass(frozen=True)
class StreamPlan:
    batch_size: int
    world_size: int
    num_workers: int
    seed: int

    def check(self, manifest: Manifest, split: str) -> None:
        n = len(manifest.split(split).shards)
        need = self.world_size * max(1, self.num_workers)
        if n < need:
            raise DataError(
                f"split {split} has {n} shards but {self.world_size} ranks x {max(1, self.num_workers)} workers need "
                f"at least {need}; lower data.num_workers or prepare with --train-shards {need} or more"
            )

    def steps_in_epoch(self, manifest: Manifest, split: str, epoch: int) -> int:
        shards = manifest.split(split).shards
        assign = epoch_assignment(len(shards), self.seed, epoch, self.world_size, self.num_workers)
        # The workers' partial batches are merged: a rank loses less than one batch per epoch.
        per_rank = [sum(shards[i].num_samples for worker in rank for i in worker) // self.batch_size for rank in assign]
        steps = min(per_rank)
        if steps == 0:
            raise DataError(
                f"train.batch_size {self.batch_size} is larger than what a data worker holds; "
                "lower the batch size or data.num_workers"
            )
        return steps


class TrainStream(IterableDataset):
    """Yields (x uint8 [B,28,28], y int64 [B], idx int64 [B]) batches for one rank and epoch.

    Two other items may appear: an int, the number of samples of an unreadable shard that were
    skipped (on_error="skip"); and, with on_error="raise", a str ending the stream: the error
    message. An exception raised in a DataLoader worker reaches the trainer wrapped in the
    worker's traceback text, which is no message for a user.
    """

    def __init__(self, manifest: Manifest, source: ShardSource, split: str, plan: StreamPlan, rank: int,
                 shuffle_buffer: int, on_error: str = "raise", hflip: bool = False, shift: int = 0):
        self.shards = manifest.split(split).shards
        self.source = source
        self.plan = plan
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.hflip = hflip
        self.shift = shift
        # Shared memory: persistent DataLoader workers hold their own copy of this object.
        self._epoch = multiprocessing.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info else 0
        assign = epoch_assignment(len(self.shards), self.plan.seed, self.epoch, self.plan.world_size, self.plan.num_workers)
        mine = assign[self.rank][worker]
        rng = np.random.default_rng([self.plan.seed, self.epoch, self.rank, worker])
        try:
            yield from self._batches((self.shards[i] for i in mine), rng)
        except DataError as err:
            yield str(err)

    def _blocks(self, shards):
        """(x, y, idx) blocks of the shards; in skip mode a bad shard ends early with the count of its lost samples."""
        for shard in shards:
            read = 0
            try:
                for block in read_blocks(self.source, shard):
                    read += len(block[1])
                    yield block
            except DataError as err:
                if self.on_error == "raise":
                    raise
                lost = shard.num_samples - read
                print(f"warning: data.on_error=skip: {lost} samples of {self.source.location(shard)} skipped ({err})",
                      file=sys.stderr, flush=True)
                yield lost

    def _batches(self, shards, rng: np.random.Generator):
        bs = self.plan.batch_size
        pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        pooled = 0
        for block in self._blocks(shards):
            if isinstance(block, int):
                yield block
                continue
            pool.append(block)
            pooled += len(block[1])
            if pooled >= max(self.shuffle_buffer, bs):
                pool, pooled = (yield from self._drain(pool, rng, keep_tail=True))
        yield from self._drain(pool, rng, keep_tail=False)

    def _drain(self, pool, rng, keep_tail: bool):
        """Shuffle the window, emit its full batches; carry the remainder (< batch) on, or, at the
        end of the worker's data, emit it as one partial batch for the rank to merge."""
        bs = self.plan.batch_size
        if not pool:
            return [], 0
        x, y, idx = (np.concatenate(parts) for parts in zip(*pool, strict=True))
        order = rng.permutation(len(y))
        full = len(y) // bs * bs
        for start in range(0, full, bs):
            yield self._batch(x, y, idx, order[start : start + bs], rng)
        if full == len(y):
            return [], 0
        rest = order[full:]
        if not keep_tail:
            yield self._batch(x, y, idx, rest, rng)
            return [], 0
        return [(x[rest], y[rest], idx[rest])], len(rest)

    def _batch(self, x, y, idx, sel, rng):
        xb = x[sel]  # fancy indexing copies: safe to flip in place
        if self.hflip:
            flip = rng.random(len(sel)) < 0.5
            xb[flip] = xb[flip, :, ::-1]
        if self.shift:
            xb = shift_images(xb, self.shift, rng)
        return torch.from_numpy(xb), torch.from_numpy(y[sel]), torch.from_numpy(idx[sel])


def shift_images(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of a (n, h, w) batch moved by its own random offset in [-max_shift, max_shift]
    along both axes, zero-filled: one gather from a padded copy, no per-image Python loop."""
    n, h, w = x.shape
    padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def save_sample_ids(output_dir: Path, rank: int, batches: list[np.ndarray]) -> None:
    """Audit: the sample ids this rank trained on, one row per step, as output_dir/sample_ids/rank-N.npy."""
    (output_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "sample_ids" / f"rank-{rank:05d}.npy", np.stack(batches))


def merge_partial_batches(items: Iterator, batch_size: int) -> Iterator:
    """The loader's items with the workers' partial batches joined into full ones (in the order
    they arrive, which the DataLoader keeps fixed); other items (counts, messages) pass through.
    What is left at the end, less than one batch, is dropped."""
    pending: list[tuple[torch.Tensor, ...]] = []
    held = 0
    for item in items:
        if isinstance(item, (int, str)) or len(item[1]) == batch_size:
            yield item
            continue
        pending.append(item)
        held += len(item[1])
        if held >= batch_size:
            joined = [torch.cat(parts) for parts in zip(*pending, strict=True)]
            yield tuple(t[:batch_size] for t in joined)
            rest = tuple(t[batch_size:] for t in joined)
            pending, held = ([rest], len(rest[1])) if len(rest[1]) else ([], 0)


def make_train_loader(stream: TrainStream, pin_memory: bool) -> DataLoader:
    # batch_size=None: the stream already batches; the loader only runs workers. Workers persist:
    # starting them again every epoch cost as much as the epoch's tail.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.plan.num_workers,
        pin_memory=pin_memory,
        persistent_workers=stream.plan.num_workers > 0,
        prefetch_factor=4 if stream.plan.num_workers else None,
    )


def load_split_arrays(manifest: Manifest, source: ShardSource, split: str) -> tuple[np.ndarray, ...]:
    """The whole split in memory, in manifest order: (images uint8 [n, H, W], labels int64 [n],
    sample ids int64 [n], shard start offsets [shards + 1])."""
    xs, ys, ids, offsets = [], [], [], [0]
    for shard in manifest.split(split).shards:
        for x, y, idx in read_blocks(source, shard):
            xs.append(x)
            ys.append(y.astype(np.int64))
            ids.append(idx.astype(np.int64))
        offsets.append(offsets[-1] + shard.num_samples)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids), np.asarray(offsets)


def load_split_tensors(manifest: Manifest, source: ShardSource, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of the whole split (evaluation: 10k x 784 bytes)."""
    x, y, _, _ = load_split_arrays(manifest, source, split)
    return torch.from_numpy(x), torch.from_numpy(y)

