"""This rank's optimizer steps, epoch by epoch, from any step: the trainer's view of its data.

Both sources yield, per optimizer step, the rank's A micro-batches (x, y, ids, lengths) in accumulation
order, as pipeline/data/order.py and canonical.py lay them out. `StreamBatches` reassembles the
loader workers' windows in order and cuts each stream's run of samples into micro-batches;
`ResidentBatches` (resident.py) indexes device memory. Either
turns the loader's side channels into trainer terms (a worker's error message into a DataError,
stand-in counts into a counter) and records trained sample ids for audits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data import canonical, ragged
from pipeline.data.provider import MicroBatch, save_sample_ids
from pipeline.data.stream import TrainStream, WindowItem, make_train_loader
from pipeline.errors import DataError


class StreamBatches:
    """The train split read from shards by the loader's workers (a BatchProvider: pipeline/data/provider.py)."""

    def __init__(self, stream: TrainStream, *, seed: int, data_dir: str, pin_memory: bool, record_sample_ids: bool):
        self.stream = stream
        self.layout = stream.plan.layout
        self.loader = make_train_loader(stream, pin_memory=pin_memory)
        # A private generator: the loader's base seed must not consume the global RNG.
        self.loader.generator = torch.Generator().manual_seed(seed)
        self.data_dir = data_dir
        self.sample_ids: list[np.ndarray] | None = [] if record_sample_ids else None
        self.skipped_samples = 0  # places of unreadable samples taken by others (on_error=skip)
        self.bytes_read = 0  # of training shards, by this rank's stream
        self.padding = ragged.PaddingCount()

    def epoch(self, epoch: int, start: int, count: int) -> Iterator[list[MicroBatch]]:
        """`count` steps of `epoch` from step `start`: each step's micro-batch a comes from the rank's
        stream of chunk a (canonical.rank_streams), m samples at a time."""
        self.stream.set_epoch(epoch, start)
        plan = self.stream.plan
        streams = canonical.rank_streams(self.layout, plan.streams, self.stream.rank)
        buffers = {s: _Runs() for s in streams}
        items = self._windows()
        for done in range(count):
            pending: list[MicroBatch] = []
            for s in streams:
                while len(buffers[s]) < self.layout.micro_batch:
                    item = next(items, None)
                    if item is None:
                        raise DataError(f"the training stream of epoch {epoch} ended {count - done} step(s) early: the shards "
                                        f"hold fewer samples than the manifest says; run prepare_data.py --verify "
                                        f"{self.data_dir}")
                    buffers[item.stream].add(item)
                micro = buffers[s].take(self.layout.micro_batch, plan.ragged)
                if micro[3] is not None:
                    self.padding.add(micro[3])
                pending.append(micro)
            if self.sample_ids is not None:
                self.sample_ids.append(torch.cat([b[2] for b in pending]).numpy())
            yield pending

    def _windows(self) -> Iterator[WindowItem]:
        """The workers' windows back in the rank's reading order (each worker hands its own over in order)."""
        held: dict[int, WindowItem] = {}
        expected = 0
        for item in self.loader:
            if isinstance(item, str):  # a worker hit bad data in raise mode, or a failed transfer: its message
                err = DataError(item)
                err.exit_code = getattr(item, "exit_code", err.exit_code)  # a transfer's 75 or 2 survives the worker
                raise err
            self.skipped_samples += item.skipped
            self.bytes_read += item.bytes_read
            held[item.index] = item
            while expected in held:
                yield held.pop(expected)
                expected += 1
        if held:
            raise RuntimeError(f"windows {sorted(held)} arrived, but window {expected} never did")

    def save_sample_ids(self, output_dir: Path, rank: int) -> None:
        if self.sample_ids is not None:
            save_sample_ids(output_dir, rank, self.sample_ids)


class _Runs:
    """One stream's samples in sequence order, across windows, taken m at a time."""

    def __init__(self):
        self.items: list[WindowItem] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, item: WindowItem) -> None:
        if len(item.y):
            self.items.append(item)
            self.count += len(item.y)

    def take(self, m: int, ragged_lengths: bool) -> MicroBatch:
        """The next m samples, padded to their longest; the rest stays."""
        x, lengths, y, ids = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in
                              zip(*((b.x, b.lengths, b.y, b.ids) for b in self.items), strict=True))
        end = int(lengths[:m].sum())
        run = lengths[:m]
        micro = (ragged.pad(x[:end], run), y[:m], ids[:m], run if ragged_lengths else None)
        rest = WindowItem(-1, -1, x[end:], lengths[m:], y[m:], ids[m:], 0)
        self.items, self.count = ([rest], len(rest.y)) if len(rest.y) else ([], 0)
        return micro
