"""This rank's optimizer steps, epoch by epoch, from any step: the trainer's view of its data.

Both sources yield, per optimizer step, the rank's A micro-batches (x, y, ids, lengths) in accumulation
order, as pipeline/data/order.py lays them out. `StreamBatches` reassembles the loader workers'
windows in order and cuts them; `ResidentBatches` (resident.py) indexes device memory. Either
turns the loader's side channels into trainer terms (a worker's error message into a DataError,
stand-in counts into a counter) and records trained sample ids for audits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data import ragged
from pipeline.data.stream import TrainStream, WindowItem, make_train_loader, save_sample_ids
from pipeline.errors import DataError

# (x [m, longest, F] padded, labels [m], sample ids [m], lengths [m] or None for a data set of one length)
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


class StreamBatches:
    def __init__(self, stream: TrainStream, *, seed: int, data_dir: str, pin_memory: bool, record_sample_ids: bool):
        self.stream = stream
        self.layout = stream.plan.layout
        self.loader = make_train_loader(stream, pin_memory=pin_memory)
        # A private generator: the loader's base seed must not consume the global RNG.
        self.loader.generator = torch.Generator().manual_seed(seed)
        self.data_dir = data_dir
        self.sample_ids: list[np.ndarray] | None = [] if record_sample_ids else None
        self.skipped_samples = 0  # places of unreadable samples taken by others (on_error=skip)
        self.padding = ragged.PaddingCount()

    def epoch(self, epoch: int, start: int, count: int) -> Iterator[list[MicroBatch]]:
        """`count` steps of `epoch` from step `start`."""
        self.stream.set_epoch(epoch, start)
        m, steps = self.layout.micro_batch, self.layout.accumulation
        pending: list[MicroBatch] = []
        for micro in self._micro_batches(self._windows(self.stream.first_window(epoch, start)), m,
                                         self.stream.plan.ragged):
            if micro[3] is not None:
                self.padding.add(micro[3])
            pending.append(micro)
            if len(pending) == steps:
                if self.sample_ids is not None:
                    self.sample_ids.append(torch.cat([b[2] for b in pending]).numpy())
                yield pending
                pending = []
                count -= 1
                if count == 0:
                    return
        raise DataError(f"the training stream of epoch {epoch} ended {count} step(s) early: the shards hold fewer samples "
                        f"than the manifest says; run prepare_data.py --verify {self.data_dir}")

    def _windows(self, first: int) -> Iterator[WindowItem]:
        """The workers' windows back in window order, from window `first` (each worker hands its own over in order)."""
        held: dict[int, WindowItem] = {}
        expected = first
        for item in self.loader:
            if isinstance(item, str):  # a worker hit bad data in raise mode, or a failed transfer: its message
                err = DataError(item)
                err.exit_code = getattr(item, "exit_code", err.exit_code)  # a transfer's 75 or 2 survives the worker
                raise err
            self.skipped_samples += item.skipped
            held[item.index] = item
            while expected in held:
                yield held.pop(expected)
                expected += 1
        if held:
            raise RuntimeError(f"windows {sorted(held)} arrived, but window {expected} never did")

    @staticmethod
    def _micro_batches(windows: Iterator[WindowItem], m: int, ragged_lengths: bool) -> Iterator[MicroBatch]:
        """Runs of m samples across windows, each padded to its own longest sample."""
        buffered: list[WindowItem] = []
        have = 0
        for item in windows:
            if not len(item.y):
                continue
            buffered.append(item)
            have += len(item.y)
            if have < m:
                continue
            x, lengths, y, ids = (torch.cat(parts) for parts in
                                  zip(*((b.x, b.lengths, b.y, b.ids) for b in buffered), strict=True))
            ends = torch.cumsum(lengths, 0)
            full = len(y) // m * m
            for start in range(0, full, m):
                lo = int(ends[start - 1]) if start else 0
                run = lengths[start:start + m]
                padded = ragged.pad(x[lo:int(ends[start + m - 1])], run)
                yield padded, y[start:start + m], ids[start:start + m], run if ragged_lengths else None
            lo = int(ends[full - 1]) if full else 0
            rest = WindowItem(-1, x[lo:], lengths[full:], y[full:], ids[full:], 0)
            buffered, have = ([rest], len(rest.y)) if len(rest.y) else ([], 0)

    def save_sample_ids(self, output_dir: Path, rank: int) -> None:
        if self.sample_ids is not None:
            save_sample_ids(output_dir, rank, self.sample_ids)
