"""A source's cases staged on disk in one pass, then read back in any order in bounded memory.

The preparation reads the source once: values go to a flat file in the directory the data set is
built in, beside its shards (the source's dtype, step after step), and what the splits need (lengths,
labels, groups, the source's split) stays in memory, a few bytes per case. Shards are then cut in any
order by reading each case back at its offset, a block at a time: memory holds one block, whatever the
size of the data set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.data.shards import Block
from pipeline.sources.base import Cases

STAGING_DIR = ".staging"


class Staging:
    def __init__(self, build: Path, features: int, dtype: np.dtype):
        self.dir = build / STAGING_DIR
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.features, self.dtype = features, np.dtype(dtype)
        self._file = open(self.dir / "values.bin", "wb")
        self.bytes = 0  # handed to the staging so far: what a disk that fills while staging can be told
        self._lengths: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._splits: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []

    def add(self, cases: Cases) -> None:
        data = np.ascontiguousarray(cases.values, dtype=self.dtype).tobytes()
        self.bytes += len(data)
        self._file.write(data)
        self._lengths.append(cases.lengths.astype(np.int64))
        self._labels.append(cases.labels.astype(np.int64))
        if cases.split is not None:
            self._splits.append(cases.split.astype(str))
        if cases.groups is not None:
            self._groups.append(cases.groups.astype(str))

    def close(self) -> None:
        self._file.close()
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self.labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        self.split = np.concatenate(self._splits) if self._splits else None
        self.groups = np.concatenate(self._groups) if self._groups else None
        step_bytes = self.features * self.dtype.itemsize
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]) * step_bytes
        self._fd = os.open(self.dir / "values.bin", os.O_RDONLY)

    def block(self, rows: np.ndarray) -> Block:
        """The cases `rows` (positions in the source), in that order; their ids are those positions."""
        parts = [os.pread(self._fd, int(self.offsets[r + 1] - self.offsets[r]), int(self.offsets[r])) for r in rows]
        values = np.frombuffer(b"".join(parts), dtype=self.dtype).reshape(-1, self.features)
        return Block(values, self.lengths[rows], self.labels[rows], rows.astype(np.int64))

    def remove(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:  # its buffer cannot reach a full disk: the error that stopped the run is reported
                pass
        if hasattr(self, "_fd"):
            os.close(self._fd)
        shutil.rmtree(self.dir, ignore_errors=True)
