"""What every rank agrees on about an epoch: the batch layout, the order's seed and window, its steps;
and the epoch's order of split positions, from canonical.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data import canonical
from pipeline.data.manifest import Manifest
from pipeline.data.order import BatchLayout


@dataclass(frozen=True)
class EpochPlan:
    """What every rank agrees on about an epoch: the layout, the order's seed and window, its steps."""

    layout: BatchLayout
    seed: int
    window: int  # data.shuffle_buffer: samples per window, at least
    steps: int  # global batches per epoch (the same in every epoch)
    length_buckets: bool = False  # micro-batches of similar lengths (order.bucketed_window_permutation)
    ragged: bool = False  # the samples' lengths vary: micro-batches are padded and carry their lengths
    streams: int = 1  # data.canonical_streams (canonical.py): a rank reads the streams of its micro-batches

    @classmethod
    def make(cls, manifest: Manifest, split: str, layout: BatchLayout, seed: int, window: int,
             length_buckets: bool = True, streams: int = 1) -> EpochPlan:
        canonical.check_streams(layout, streams)
        ragged = varying_lengths(manifest)
        steps = canonical.steps_in_epoch(manifest.split(split).num_samples, layout.global_batch, streams)
        return cls(layout, seed, window, steps, length_buckets and ragged, ragged, streams)

    def sequence(self, shard_sizes: list[int], lengths: np.ndarray, epoch: int) -> np.ndarray:
        """The epoch's sequence of split positions (canonical.epoch_sequence); `lengths` by split position."""
        return canonical.epoch_sequence(shard_sizes, lengths if self.length_buckets else None, self.seed, epoch,
                                        self.window, self.layout, self.streams)


def varying_lengths(manifest: Manifest) -> bool:
    """Whether the data set's cases differ in length (in any split): then batches are padded and masked."""
    spans = [(s.lengths.min, s.lengths.max) for s in manifest.splits.values()]
    return len({v for span in spans for v in span}) > 1
