"""Ragged cases (values of every step concatenated, plus a length per case) taken apart and padded.

Shards, windows and the stream keep cases ragged; a micro-batch becomes one padded array only when
it is cut, padded to its own longest case (right padding, zeros). A data set of one length (the
images) pads nothing: its micro-batch is a view of the same bytes."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data import order


def starts(lengths: np.ndarray) -> np.ndarray:
    """Where each case's steps begin in the concatenated values."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else np.zeros(0, np.int64)


def take(values: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cases `rows`, in that order: (their values concatenated, their lengths)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    chosen = lengths[rows]
    first = starts(lengths)[rows]
    # Each output step's source row: its case's first step plus its place in the case.
    index = np.repeat(first - starts(chosen), chosen) + np.arange(int(chosen.sum()))
    return values[index], chosen


class PaddingCount:
    """Padded and real steps of the micro-batches a rank computed: over the run, and since the last `take`."""

    def __init__(self) -> None:
        self.total = [0, 0]
        self.window = [0, 0]

    def add(self, lengths) -> None:
        """One micro-batch, padded to its longest case."""
        padded, real = order.padded_and_real(lengths)
        for counts in (self.total, self.window):
            counts[0] += padded
            counts[1] += real

    def take(self) -> tuple[int, int]:
        """(padded, real) since the last take."""
        out = tuple(self.window)
        self.window = [0, 0]
        return out


def pad(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[n, longest, F], zeros after each case's last step; a view when every case has the same length."""
    n = len(lengths)
    longest = int(lengths.max()) if n else 0
    if n and int(lengths.min()) == longest:
        return values.reshape(n, longest, values.shape[-1])
    out = values.new_zeros((n, longest, values.shape[-1]))
    steps = torch.arange(longest, device=lengths.device)
    mask = steps[None, :] < lengths[:, None]
    out[mask] = values
    return out
