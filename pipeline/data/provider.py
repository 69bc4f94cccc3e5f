"""What the trainer asks of the train split's batches, wherever they come from.

Two providers implement it: `StreamBatches` (pipeline/training/batches.py) reads shards through the
loader's workers, `ResidentBatches` (resident.py) indexes the split held in device memory. The loop
and the end of a run use this interface and nothing else of either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from pipeline.data.ragged import PaddingCount

# (x [m, longest, F] padded, labels [m], sample ids [m], lengths [m] or None for a data set of one length)
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


class BatchProvider(Protocol):
    skipped_samples: int  # places of unreadable samples taken by other samples (data.on_error=skip)
    bytes_read: int  # of training shards, by this rank, in this launch
    padding: PaddingCount  # padded and real steps of the micro-batches handed out since the last take()

    def epoch(self, epoch: int, start: int, count: int) -> Iterator[list[MicroBatch]]:
        """`count` optimizer steps of `epoch` from its step `start`: each this rank's micro-batches, in
        accumulation order."""
        ...

    def save_sample_ids(self, output_dir: Path, rank: int) -> None:
        """The ids of the samples this rank trained on, where data.record_sample_ids asked for them."""
        ...


def save_sample_ids(output_dir: Path, rank: int, batches: list[np.ndarray]) -> None:
    """Audit: the sample ids this rank trained on, one row per step, as output_dir/sample_ids/rank-N.npy."""
    (output_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "sample_ids" / f"rank-{rank:05d}.npy", np.stack(batches))
