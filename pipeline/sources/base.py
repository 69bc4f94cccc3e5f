"""What every source of labelled sequences gives the preparation, and the checks they share.

A source reads one format (IDX images, `.npz`, UEA/UCR `.ts`, Parquet) and yields its cases in
runs (`Cases`) in source order, in bounded memory: values of a run concatenated step by step,
`[sum of lengths, features]`, in the source's own dtype. The preparation (pipeline/data/prepare.py)
reads a source once; splits, shards and statistics are its business, not the source's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from pipeline.errors import DataError

# The dtypes a shard keeps as they are; anything else (float64, ints) becomes float32 on purpose.
KEPT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))
SPLIT_NAMES = ("train", "val", "test")


class InputError(DataError):
    """A user's input file that cannot be used as it is: the message names the file, the case and what
    to do. Exit 2, like a bad config: nothing is written for it."""

    exit_code = 2


@dataclass
class Cases:
    """A run of labelled cases from one file, in source order."""

    values: np.ndarray  # [sum(lengths), features], the source's dtype
    lengths: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]: indices into the source's class_names
    file: str  # the file they come from, as messages name it
    where: np.ndarray  # int64 [n]: each case's place in `file`, for messages (see `unit`)
    unit: str  # what `where` counts: "line" (1-based), "row" or "index" (0-based)
    split: np.ndarray | None = None  # str [n]: the split the source assigns ("train", "val", "test"), if any
    groups: np.ndarray | None = None  # str [n]: a group key (a speaker, a subject) kept out of two splits

    def __len__(self) -> int:
        return len(self.lengths)

    def case_at(self, row: int) -> tuple[int, int]:
        """(case, step within it) of a row of the concatenated values."""
        ends = np.cumsum(self.lengths)
        case = int(np.searchsorted(ends, row, side="right"))
        return case, int(row - (ends[case] - self.lengths[case]))

    def case(self, i: int) -> str:
        """Case i as a message names it: 'line 57 of X_TRAIN.ts'."""
        return f"{self.unit} {int(self.where[i])} of {self.file}"


@dataclass
class SourceInfo:
    """What a source knows before its cases are read."""

    name: str  # the data set's default name
    files: list[Path]  # every file it reads, for the manifest's sha256
    class_names: list[str]
    features: int
    dtype: np.dtype  # one of KEPT_DTYPES
    image_shape: tuple[int, int] | None = None  # (steps, features) for the image data sets
    has_splits: bool = False  # the source assigns every case a split (Cases.split)
    notes: list[str] = field(default_factory=list)  # what the preparation should tell the user


class Source(Protocol):
    info: SourceInfo

    def cases(self) -> Iterator[Cases]:
        """The cases in source order, a bounded run at a time; InputError naming the case on bad input."""
        ...


def kept_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype shards store for a source dtype: uint8, float16 and float32 as they are, else float32."""
    dtype = np.dtype(dtype)
    return dtype if dtype in KEPT_DTYPES else np.dtype(np.float32)


def narrowed(cases: Cases, dtype: np.dtype) -> Cases:
    """The cases' values cast to `dtype` (a source's kept dtype). A finite value beyond its range (float64
    1e300 in float32) is refused by name here: the cast would make it infinite, and the user would be
    told of an infinite value their file does not hold."""
    dtype = np.dtype(dtype)
    values = cases.values
    if values.dtype.kind == "f" and dtype.kind == "f" and np.finfo(values.dtype).max > np.finfo(dtype).max:
        limit = np.finfo(dtype).max
        with np.errstate(invalid="ignore"):
            big = np.isfinite(values) & (np.abs(values) > limit)
        if big.any():
            row, column = (int(i[0]) for i in np.nonzero(big))
            case, step = cases.case_at(row)
            raise InputError(f"{cases.case(case)} holds {values[row, column]:g} (step {step}, channel {column}), beyond "
                             f"the range of {dtype} (about {limit:.1e}), the dtype its values are kept in; "
                             f"{int(big.sum())} such value(s) in this run of the file. Rescale the values and prepare again")
    return Cases(**{**cases.__dict__, "values": values.astype(dtype, copy=False)})


def check_cases(cases: Cases, features: int, missing: str = "refuse") -> Cases:
    """The checks every format shares: feature count, lengths of at least 1, finite values. With
    `missing="interpolate"` NaNs (a `.ts` file's `?`) are filled linearly along time within their case
    and channel, from the nearest values at the edges; `"zero"` fills them with 0. Infinite values
    are always refused."""
    if cases.values.ndim != 2 or cases.values.shape[1] != features:
        shape = "x".join(map(str, cases.values.shape))
        raise InputError(f"{cases.file} holds cases of {cases.values.shape[-1] if cases.values.ndim else 0} channels "
                         f"(values shaped {shape}), but the data set has {features}: every file of one data set "
                         "must have the same channels. Prepare files with other channels as a data set of their own")
    short = np.flatnonzero(cases.lengths < 1)
    if len(short):
        length = int(cases.lengths[short[0]])  # said as it is: a negative length is a broken lengths array
        what = "is a sequence of length 0" if length == 0 else f"has length {length}, a negative number of steps"
        raise InputError(f"{cases.case(short[0])} {what} ({len(short)} case(s) of length 0 or less): every case "
                         "needs at least one step. Fix the lengths or remove those cases, and prepare again")
    if int(cases.lengths.sum()) != len(cases.values):
        raise InputError(f"{cases.file}: the lengths sum to {int(cases.lengths.sum())} steps, but there are "
                         f"{len(cases.values)} rows of values; the lengths do not describe these values")
    if cases.values.dtype.kind != "f":
        return cases
    bad = ~np.isfinite(cases.values)
    if not bad.any():
        return cases
    rows = np.flatnonzero(bad.any(axis=1))
    case, step = cases.case_at(int(rows[0]))
    infinite = np.isinf(cases.values).any()
    if infinite or missing == "refuse":
        what = "an infinite value" if infinite else "a missing value (NaN, or '?' in a .ts file)"
        fix = ("remove or clip them in the file" if infinite else
               "fix the file, or pass --missing interpolate (linear in time, within the case) or --missing zero")
        raise InputError(f"{cases.case(case)} holds {what} (step {step}); "
                         f"{int(bad.sum())} such value(s) in this run of the file. To prepare it, {fix}")
    return _fill(cases, missing)


def _fill(cases: Cases, missing: str) -> Cases:
    values = cases.values.copy()
    if missing == "zero":
        values[np.isnan(values)] = 0
        return Cases(**{**cases.__dict__, "values": values})
    ends = np.cumsum(cases.lengths)
    for i, (lo, hi) in enumerate(zip(ends - cases.lengths, ends, strict=True)):
        block = values[lo:hi]
        for c in np.flatnonzero(np.isnan(block).any(axis=0)):
            column = block[:, c]
            known = np.flatnonzero(~np.isnan(column))
            if len(known) == 0:
                raise InputError(f"{cases.case(i)}: channel {c} has no value at all, so --missing interpolate has "
                                 "nothing to fill it from; use --missing zero or remove the case")
            column[:] = np.interp(np.arange(len(column)), known, column[known])
    return Cases(**{**cases.__dict__, "values": values})
