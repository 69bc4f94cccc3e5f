"""This rank's training batches, epoch by epoch, from any position: the trainer's view of the stream.

It turns the loader's side channels into trainer terms (a worker's error message into a
DataError, skipped-sample counts into a counter), keeps every rank's step count equal when
data.on_error=skip loses data, and records trained sample ids for audits.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data.stream import TrainStream, make_train_loader, merge_partial_batches, save_sample_ids
from pipeline.errors import DataError


class TrainBatches:
    def __init__(self, stream: TrainStream, *, rank: int, seed: int, on_error: str, data_dir: str,
                 pin_memory: bool, record_sample_ids: bool):
        self.stream = stream
        self.loader = make_train_loader(stream, pin_memory=pin_memory)
        # A private generator: the loader's base seed must not consume the global RNG, or a
        # resumed run's dropout masks would differ from an uninterrupted run's.
        self.loader.generator = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.on_error = on_error
        self.data_dir = data_dir
        self.sample_ids: list[np.ndarray] | None = [] if record_sample_ids else None
        self.skipped_samples = 0  # lost to unreadable shards (on_error=skip)
        self.padded_passes = 0  # epoch streams restarted to make up for them

    def epoch(self, epoch: int, start: int, count: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """`count` batches of `epoch`, starting after its first `start` (exact resume replays the position)."""
        batches = self._stream_epoch(epoch)
        for _ in range(start):
            next(batches)
        for batch in islice(batches, count):
            if self.sample_ids is not None:
                self.sample_ids.append(batch[2].numpy())
            yield batch

    def _stream_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """The epoch's batches; with on_error=skip the epoch's stream restarts to pad a rank that
        lost data, so every rank still takes the same number of steps."""
        self.stream.set_epoch(epoch)
        while True:
            produced = 0
            for item in merge_partial_batches(self.loader, self.stream.plan.batch_size):
                if isinstance(item, str):  # a worker hit bad data in raise mode: its message
                    raise DataError(item)
                if isinstance(item, int):  # skip mode: samples lost to an unreadable shard
                    self.skipped_samples += item
                    continue
                produced += 1
                yield item
            if self.on_error == "raise":
                raise DataError(f"rank {self.rank} ran out of training data after {produced} batches of epoch {epoch}: the "
                                f"shards hold fewer samples than the manifest says; run prepare_data.py --verify {self.data_dir}")
            if produced == 0:
                raise DataError(f"rank {self.rank} has no readable training data left in epoch {epoch} (data.on_error=skip)")
            self.padded_passes += 1

    def save_sample_ids(self, output_dir: Path) -> None:
        if self.sample_ids is not None:
            save_sample_ids(output_dir, self.rank, self.sample_ids)
