"""What the manifest says about a split's contents: class counts, sequence lengths, and the per-channel
normalisation statistics of the train split, accumulated block by block in float64."""

from __future__ import annotations

import numpy as np

from pipeline.data.manifest import Histogram, LengthStats, Normalization

HISTOGRAM_BINS = 20


def class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(class_names))
    return {name: int(c) for name, c in zip(class_names, counts, strict=True)}


def length_stats(lengths: np.ndarray) -> LengthStats:
    """Min, median, max and a histogram of up to 20 bins of whole steps (one bin per length when they span
    fewer than 20 values)."""
    lo, hi = int(lengths.min()), int(lengths.max())
    width = max(1, -(-(hi - lo + 1) // HISTOGRAM_BINS))
    edges = np.arange(lo, hi + width + 1, width)
    counts, _ = np.histogram(lengths, bins=edges)
    return LengthStats(min=lo, median=float(np.median(lengths)), max=hi,
                       histogram=Histogram(edges=[float(e) for e in edges], counts=[int(c) for c in counts]))


class ChannelMoments:
    """Running mean and variance per channel over every step seen (Chan et al.'s pairwise update: stable
    in float64 where a sum of squares of large values would cancel)."""

    def __init__(self, features: int):
        self.count = 0
        self.mean = np.zeros(features)
        self.m2 = np.zeros(features)

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        block = values.astype(np.float64)
        n = len(block)
        mean = block.mean(axis=0)
        m2 = ((block - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    def result(self) -> Normalization:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return Normalization(split="train", mean=[float(m) for m in self.mean], std=[float(s) for s in std])
