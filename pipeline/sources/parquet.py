"""Labelled sequences from Parquet, read a record batch at a time with pyarrow (bounded memory).

One row per sequence: a label column plus either one `list<list<float>>` column (a list of steps,
each a list of features) or one `list<float>` column per channel (all of a row's channels equally
long). Optional `group` (any type, kept as str) and `split` (train/val/test) columns. The path is a
`.parquet` file or a directory of `*.parquet` files read in name order. Where labels are optional
(`labels_required=False`, cases to predict) the label column may be left out: the cases then label -1.

Memory: `open_parquet` reads only the label column, a row group at a time, plus the first batch of
each file's sequence column to learn the feature count; `cases()` holds one record batch (at most
_BATCH_ROWS rows, fewer when rows are large) and the row group pyarrow decodes it from. So memory
follows the row group size, not the file size (benchmarks/parquet_memory.py: 213 vs 220 MiB peak RSS
reading 200 MB and 2 GB files with row groups of 1,000 rows); SourceInfo.notes says when a file's
row groups are large enough to matter.
Nested lists become numpy through their flattened child arrays, never row by row.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sources.base import SPLIT_NAMES, Cases, InputError, SourceInfo, kept_dtype, narrowed

T = TypeVar("T")

_BATCH_ROWS = 1024
_BATCH_BYTES = 64 << 20  # uncompressed bytes of the columns read, per batch: rows of long sequences get fewer rows
_LARGE_ROW_GROUP = 512 << 20  # bytes of a row group's columns read: above this, tell the user
_LAYOUT_FLAGS = "--sequence-column (one list<list<float>> column) or --channel-columns (one list<float> column per channel)"
# What Spark, Hadoop and Arrow write beside the .parquet files of a data set (_SUCCESS, _metadata,
# _common_metadata, .crc checksums, _temporary/): skipped without a word, as pyarrow.dataset skips them.
_QUIET_PREFIXES = (".", "_")
_SHOWN_UNREAD = 10  # names a note lists before "and N more"


@dataclass(frozen=True)
class _Columns:
    """The columns the user named, and which layout they select."""

    label: str | None  # None: unlabelled cases (labels_required=False)
    sequence: str | None
    channels: tuple[str, ...]
    group: str | None
    split: str | None

    def value_columns(self) -> list[str]:
        return [self.sequence] if self.sequence else list(self.channels)

    def all(self) -> list[str]:
        return [c for c in (self.label, *self.value_columns(), self.group, self.split) if c]


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _plain(t: pa.DataType) -> pa.DataType:
    # A dictionary-encoded column (pandas categoricals) is checked and read as its values.
    return t.value_type if pa.types.is_dictionary(t) else t


def _describe(t: pa.DataType) -> str:
    """A type as messages show it and files are compared by, without the child field names
    (`item` vs `element`) that differ between writers."""
    t = _plain(t)
    if _is_list(t):
        return f"list<{_describe(t.value_type)}>"
    return str(t)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


class ParquetSource:
    """A base.Source over Parquet files; build it with `open_parquet`."""

    def __init__(self, info: SourceInfo, columns: _Columns, labels: list[int] | list[str], features_from: str,
                 read_dtype: np.dtype) -> None:
        self.info = info
        self._columns = columns
        self._labels = labels  # class index -> the label's value in the file; [] for unlabelled cases
        self._features_from = features_from  # the step that set info.features, for messages
        self._read_dtype = read_dtype  # the values' own dtype, narrowed to info.dtype with its range checked

    def cases(self) -> Iterator[Cases]:
        """One Cases per record batch, in file then row order."""
        value_set = None
        if self._columns.label:
            value_set = pa.array(self._labels, type=pa.int64() if isinstance(self._labels[0], int) else pa.string())
        for path in self.info.files:
            for start, batch in _batches(path, self._columns.all()):
                cases = _to_cases(batch, start, str(path), self._columns, self.info, value_set, self._features_from,
                                  self._read_dtype)
                yield narrowed(cases, self.info.dtype)


def open_parquet(path: Path, label_column: str | None = None, sequence_column: str | None = None,
                 channel_columns: list[str] | None = None, group_column: str | None = None,
                 split_column: str | None = None, name: str | None = None, *,
                 labels_required: bool = True) -> ParquetSource:
    """A source of the Parquet file or directory at `path`; InputError on anything it cannot read as described.
    `label_column` may be None only with `labels_required=False` (cases to predict): class_names [], labels -1."""
    path = Path(path)
    if not label_column and labels_required:
        raise InputError(f"{path}: no label column given; name the column that holds each row's class with "
                         "--label-column")
    if bool(sequence_column) == bool(channel_columns):
        which = "both" if sequence_column else "neither"
        raise InputError(f"{path}: {which} of --sequence-column and --channel-columns given; pass exactly one. "
                         f"The layout of the values is {_LAYOUT_FLAGS}")
    columns = _Columns(label_column or None, sequence_column, tuple(channel_columns or ()), group_column, split_column)
    files = _files(path)
    types = _check_schemas(files, columns)
    features, features_from = _features(files, columns)
    labels = _class_labels(files, label_column, pa.types.is_integer(types[label_column])) if label_column else []
    if not label_column:
        _refuse_empty(files)
    leaves = [_leaf(types[c]) for c in columns.value_columns()]
    read_dtype = np.result_type(*[leaf.to_pandas_dtype() for leaf in leaves])
    notes = (_unread_notes(path, files) if path.is_dir() else []) + _row_group_notes(files, columns.all())
    info = SourceInfo(name=name or (path.stem if path.is_file() else path.name), files=files,
                      class_names=[str(v) for v in labels], features=features, dtype=kept_dtype(read_dtype),
                      has_splits=bool(split_column), notes=notes)
    return ParquetSource(info, columns, labels, features_from, read_dtype)


def _read_here(path: Path) -> bool:
    """Whether a directory's entry is one of its data set's files."""
    return path.is_file() and path.suffix.lower() == ".parquet" and not path.name.startswith(_QUIET_PREFIXES)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _read_here(p))
        if not files:
            raise InputError(f"{path} is a directory without *.parquet files: pass a .parquet file or a directory of them")
        return files
    if not path.is_file():
        raise InputError(f"{path} does not exist: pass a .parquet file or a directory of *.parquet files")
    return [path]


def _unread_notes(directory: Path, files: list[Path]) -> list[str]:
    """A note naming what else a directory holds (an .npz, a .csv, a partition's subdirectory): it is not
    read, and a user who expected it to be should hear so before training on the rest."""
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                    if not _read_here(p) and not p.name.startswith(_QUIET_PREFIXES))
    if not others:
        return []
    more = len(others) - _SHOWN_UNREAD
    shown = ", ".join(others[:_SHOWN_UNREAD]) + (f" and {more} more" if more > 0 else "")
    return [f"{directory} holds {len(others)} entr(ies) that are not read ({shown}): only its {len(files)} .parquet "
            "file(s) are, not other formats or subdirectories. Write what belongs to the data set as .parquet files "
            "in the directory itself, and move the rest out"]


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())  # pyarrow's messages run over several lines
        raise InputError(f"{path} cannot be read as a Parquet file ({reason}). Check that it is a complete Parquet "
                         "file (not CSV, Feather or a partial download), or remove it from the directory") from None


def _check_schemas(files: list[Path], columns: _Columns) -> dict[str, pa.DataType]:
    """The named columns' types, the same in every file, each of the kind its flag asks for."""
    first: dict[str, pa.DataType] = {}
    for path in files:
        with _open(path) as pf:
            schema = pf.schema_arrow
        for column, flag in _flags(columns):
            if column not in schema.names:
                other = f" (the first file, {files[0]}, has it)" if first else ""
                close = difflib.get_close_matches(column, schema.names, n=1)
                guess = f" (did you mean '{close[0]}'?)" if close else ""
                raise InputError(f"{path} has no column '{column}'{other}. Its columns are: {', '.join(schema.names)}. "
                                 f"Pass the right name with {flag}{guess}")
            t = schema.field(column).type
            if not first:
                _check_type(path, column, t, columns)
            elif _describe(t) != _describe(first[column]):
                raise InputError(f"column '{column}' is {_describe(t)} in {path} but {_describe(first[column])} in "
                                 f"{files[0]}: every file of a directory must have the same types for the named "
                                 "columns. Rewrite the odd file with the others' types, or prepare it on its own")
        first = first or {c: schema.field(c).type for c in columns.all()}
    return {c: _plain(t) for c, t in first.items()}


def _flags(columns: _Columns) -> list[tuple[str, str]]:
    named = [(c, f) for c, f in ((columns.label, "--label-column"), (columns.sequence, "--sequence-column")) if c]
    named += [(c, "--channel-columns") for c in columns.channels]
    return named + [(c, f) for c, f in ((columns.group, "--group-column"), (columns.split, "--split-column")) if c]


def _leaf(t: pa.DataType) -> pa.DataType:
    while _is_list(_plain(t)):
        t = _plain(t).value_type
    return _plain(t)


def _check_type(path: Path, column: str, t: pa.DataType, columns: _Columns) -> None:
    t = _plain(t)
    if column == columns.label and not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(f"column '{column}' of {path} is {_describe(t)}, but a label column holds integers or strings "
                         "(one class per distinct value). Pass the class column with --label-column, or write "
                         "the labels as integers or strings")
    if column == columns.split and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(f"column '{column}' of {path} is {_describe(t)}, but --split-column names a column of strings "
                         f"({', '.join(SPLIT_NAMES)})")
    depth = 2 if column == columns.sequence else 1 if column in columns.channels else 0
    if depth and not _nested(t, depth):
        raise InputError(_mistyped(path, column, t, depth))


def _nested(t: pa.DataType, depth: int) -> bool:
    for _ in range(depth):
        if not _is_list(t):
            return False
        t = _plain(t.value_type)
    return _numeric(t)


def _mistyped(path: Path, column: str, t: pa.DataType, depth: int) -> str:
    wanted = ("--sequence-column selects one column per sequence holding a list of steps, each a list of features: "
              "list<list<float>>" if depth == 2 else
              "--channel-columns selects one column per channel, each row a list of that channel's values: list<float>")
    hint = "Write the values as floats (or integers)"
    if not _is_list(t) and _numeric(t):
        hint = "It holds one number per row, not a sequence: name the column that holds the sequences"
    elif depth == 2 and _nested(t, 1):
        hint = "A list<float> column holds one channel: pass the channel columns with --channel-columns instead"
    elif depth == 1 and _nested(t, 2):
        hint = f"A list<list<float>> column holds steps of features: pass it with --sequence-column {column} instead"
    return f"column '{column}' of {path} is {_describe(t)}, but {wanted}. {hint}"


def _features(files: list[Path], columns: _Columns) -> tuple[int, str]:
    """Features per step and where that count comes from: the channel count, or the first step's length
    in each file (which must agree)."""
    if not columns.sequence:
        return len(columns.channels), ""
    found: tuple[int, Path, int] | None = None  # features, file, row
    for path in files:
        for start, batch in _batches(path, [columns.sequence]):
            steps = _valid_rows(batch.column(0), str(path), start, columns.sequence)[1]
            if len(steps) == 0:
                continue  # sequences of no step so far: look further (check_cases refuses them later)
            lengths = pc.list_value_length(steps)
            row = start + int(np.searchsorted(np.cumsum(_row_lengths(batch.column(0))), 0, side="right"))
            f = _first_valid(lengths, str(path), row, columns.sequence)
            if found and f != found[0]:
                raise InputError(f"row {row} of {path} has steps of {f} features, but row {found[2]} of {found[1]} has "
                                 f"{found[0]}: every file of a directory must have the same features per step. "
                                 "Prepare files with other features as a data set of their own")
            found = found or (f, path, row)
            break
    if not found:
        raise InputError(f"no row of {', '.join(map(str, files))} has a step in column '{columns.sequence}': "
                         "there is nothing to prepare")
    return found[0], f"the first step of row {found[2]} of {found[1]}"


def _first_valid(lengths: pa.Array, file: str, row: int, column: str) -> int:
    if lengths[0].is_valid and lengths[0].as_py() > 0:
        return int(lengths[0].as_py())
    if lengths[0].is_valid:
        raise InputError(f"row {row} of {file} has a step of no features in column '{column}': every step needs at "
                         "least one value. Fix or remove the row")
    raise InputError(f"row {row} of {file} has a missing (null) step in column '{column}': remove the row or fill the step")


def _class_labels(files: list[Path], column: str, integers: bool) -> list[int] | list[str]:
    """The sorted distinct labels of every file, read a row group at a time (the label column only)."""
    seen: set = set()
    for path in files:
        with _open(path) as pf:
            start = 0
            for g in range(pf.num_row_groups):
                values = _read(path, start, lambda g=g: pf.read_row_group(g, columns=[column]).column(0))
                values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
                values = values.dictionary_decode() if pa.types.is_dictionary(values.type) else values
                _refuse_nulls(values, str(path), start, f"label in column '{column}'", "Label the row or remove it")
                seen.update(pc.unique(values).to_pylist())
                start += len(values)
    if not seen:
        _refuse_empty(files, 0)
    return sorted(seen, key=int) if integers else sorted(seen)


def _refuse_empty(files: list[Path], rows: int | None = None) -> None:
    """InputError if the files hold no rows (counted from their footers unless given)."""
    if rows is None:
        rows = 0
        for path in files:
            with _open(path) as pf:
                rows += pf.metadata.num_rows
    if rows == 0:
        raise InputError(f"{', '.join(map(str, files))} hold no rows: there is nothing to prepare")


def _read(path: Path, start: int, read: Callable[[], T]) -> T:
    """Run a pyarrow read, turning its errors (a corrupt page, a truncated file) into an InputError."""
    try:
        return read()
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())  # pyarrow's messages run over several lines
        raise InputError(f"{path} could not be read at row {start} or after ({reason}). The file is damaged or "
                         "truncated: write it again, or remove it from the directory") from None


def _batches(path: Path, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) of `columns`, in file order; batches bounded in rows and in bytes.

    One reader per row group: pyarrow 26's iter_batches over a whole file keeps every batch it decoded
    alive until the reader ends (a 2 GB file costs 2 GB), while a row group's reader frees it at its end.
    No reader threads: they only parallelise across columns, and each keeps an allocator heap (36 MiB
    more peak RSS on the benchmark's file, no faster). Returning the pool's free pages to the OS after
    each row group would save 24 MiB more but cost 30% in speed, so it is not done."""
    with _open(path) as pf:
        rows = _batch_rows(pf.metadata, columns)
        start = 0
        for g in range(pf.num_row_groups):
            batches = _read(path, start, lambda g=g: iter(pf.iter_batches(batch_size=rows, row_groups=[g], columns=columns,
                                                                          use_threads=False)))
            while (batch := _read(path, start, lambda b=batches: next(b, None))) is not None:
                yield start, batch
                start += batch.num_rows


def _group_bytes(meta: pq.FileMetaData, g: int, columns: list[str]) -> int:
    """Uncompressed bytes of `columns` (their leaves: 'x.list.element.list.element') in row group g."""
    group = meta.row_group(g)
    prefixes = tuple(c + "." for c in columns)
    chunks = (group.column(i) for i in range(group.num_columns))
    return sum(c.total_uncompressed_size for c in chunks if c.path_in_schema in columns or c.path_in_schema.startswith(prefixes))


def _batch_rows(meta: pq.FileMetaData, columns: list[str]) -> int:
    """Rows per batch: _BATCH_ROWS, or fewer so that a batch of the columns read stays near _BATCH_BYTES."""
    if meta.num_rows == 0:
        return _BATCH_ROWS
    per_row = max(1, sum(_group_bytes(meta, g, columns) for g in range(meta.num_row_groups)) // meta.num_rows)
    return int(max(1, min(_BATCH_ROWS, _BATCH_BYTES // per_row)))


def _row_group_notes(files: list[Path], columns: list[str]) -> list[str]:
    """A note per file whose row groups are so large that holding one (as pyarrow does) costs much memory."""
    notes = []
    for path in files:
        with _open(path) as pf:
            meta = pf.metadata
            largest = max((_group_bytes(meta, g, columns) for g in range(meta.num_row_groups)), default=0)
        if largest > _LARGE_ROW_GROUP:
            notes.append(f"{path} has row groups of up to {largest / 2**20:,.0f} MiB (uncompressed); reading holds one "
                         "row group at a time, so memory grows with them: write it with smaller row groups "
                         "(pyarrow's row_group_size, e.g. 1,000 rows) to prepare it in less memory")
    return notes


def _to_cases(batch: pa.RecordBatch, start: int, file: str, columns: _Columns, info: SourceInfo,
              value_set: pa.Array | None, features_from: str, dtype: np.dtype) -> Cases:
    """The batch's cases, their values in `dtype` (the columns' own: base.narrowed casts them)."""
    if columns.sequence:
        values, lengths = _sequence_values(batch.column(columns.sequence), file, start, columns.sequence,
                                           (info.features, features_from), dtype)
    else:
        values, lengths = _channel_values(batch, file, start, columns.channels, dtype)
    n = batch.num_rows
    rows = np.arange(start, start + n, dtype=np.int64)
    labels = np.full(n, -1, dtype=np.int64)
    if columns.label and value_set is not None:
        labels = _label_indices(batch.column(columns.label), file, start, columns.label, value_set)
    return Cases(values=values, lengths=lengths, labels=labels, file=file, where=rows, unit="row",
                 split=_splits(batch.column(columns.split), file, start, columns.split) if columns.split else None,
                 groups=_groups(batch.column(columns.group), file, start, columns.group) if columns.group else None)


def _refuse_nulls(array: pa.Array, file: str, start: int, what: str, fix: str,
                  row_of: Callable[[int], int] | None = None) -> None:
    """InputError naming the first null's row; `row_of` maps an index of `array` to a row of the batch."""
    if array.null_count == 0:
        return
    i = int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0])
    row = start + (row_of(i) if row_of else i)
    raise InputError(f"row {row} of {file} has a missing (null) {what} ({array.null_count} such in the batch of rows "
                     f"from {start} on). {fix}")


def _row_lengths(lists: pa.Array) -> np.ndarray:
    return pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _row_of(lengths: np.ndarray) -> Callable[[int], int]:
    """Index into the flattened children -> row of the batch."""
    ends = np.cumsum(lengths)
    return lambda i: int(np.searchsorted(ends, i, side="right"))


def _valid_rows(lists: pa.Array, file: str, start: int, column: str) -> tuple[np.ndarray, pa.Array]:
    """Per-row lengths and the flattened children of a list column without null rows."""
    _refuse_nulls(lists, file, start, f"sequence in column '{column}'", "Remove the row or fill it")
    return _row_lengths(lists), lists.flatten()


def _sequence_values(lists: pa.Array, file: str, start: int, column: str, features_from: tuple[int, str],
                     dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[sum T, F] values and T per row of a list<list<float>> column; F and the step that set it."""
    features, origin = features_from
    lengths, steps = _valid_rows(lists, file, start, column)
    row_of_step = _row_of(lengths)
    _refuse_nulls(steps, file, start, f"step in column '{column}'", "Remove the row or fill the step", row_of_step)
    widths = pc.list_value_length(steps).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(widths != features)
    if len(bad):
        step = int(bad[0])
        row = row_of_step(step)
        first = step - int(np.cumsum(lengths)[row] - lengths[row])
        raise InputError(f"row {start + row} of {file} has a step (step {first}) of {int(widths[step])} features in "
                         f"column '{column}', but the data set's steps have {features} (as {origin}): every step of every "
                         f"sequence needs the same features ({len(bad)} such step(s) in rows {start}-"
                         f"{start + len(lengths) - 1}). Fix or remove the row")
    flat = steps.flatten()
    _refuse_nulls(flat, file, start, f"value in column '{column}'", "Fill the value (or remove the row)",
                  lambda i: row_of_step(i // max(features, 1)))
    return _numpy(flat, dtype).reshape(-1, features), lengths


def _numpy(flat: pa.Array, dtype: np.dtype) -> np.ndarray:
    """The values as a writable array of `dtype`, copied once: a zero-copy view would be read-only and
    would keep the whole record batch alive as long as the Cases."""
    out = flat.to_numpy(zero_copy_only=False)
    owned = out.base is None and out.flags.writeable
    return out.astype(dtype, copy=not owned)


def _channel_values(batch: pa.RecordBatch, file: str, start: int, channels: tuple[str, ...],
                    dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[sum T, C] values and T per row of one list<float> column per channel."""
    per_channel = [_valid_rows(batch.column(c), file, start, c) for c in channels]
    lengths = per_channel[0][0]
    for c, (other, _) in zip(channels, per_channel, strict=True):
        bad = np.flatnonzero(other != lengths)
        if len(bad):
            row = int(bad[0])
            told = ", ".join(f"{name}: {int(ls[row])}" for name, (ls, _) in zip(channels, per_channel, strict=True))
            raise InputError(f"row {start + row} of {file} has channels of unequal length ({told}); channel '{c}' "
                             f"differs from '{channels[0]}'. Every channel of a row must have one value per step: "
                             "fix or remove the row")
    row_of = _row_of(lengths)
    out = np.empty((int(lengths.sum()), len(channels)), dtype=dtype)
    for j, (c, (_, flat)) in enumerate(zip(channels, per_channel, strict=True)):
        _refuse_nulls(flat, file, start, f"value in column '{c}'", "Fill the value (or remove the row)", row_of)
        out[:, j] = flat.to_numpy(zero_copy_only=False)
    return out, lengths


def _label_indices(labels: pa.Array, file: str, start: int, column: str, value_set: pa.Array) -> np.ndarray:
    labels = labels.dictionary_decode() if pa.types.is_dictionary(labels.type) else labels
    _refuse_nulls(labels, file, start, f"label in column '{column}'", "Label the row or remove it")
    index = pc.index_in(labels.cast(value_set.type), value_set=value_set)
    if index.null_count:  # the file changed since open_parquet read its labels
        i = int(np.flatnonzero(pc.is_null(index).to_numpy(zero_copy_only=False))[0])
        raise InputError(f"row {start + i} of {file} has label {labels[i].as_py()!r}, which was not in the file when "
                         "it was opened: the file changed while being read. Prepare it again")
    return index.to_numpy(zero_copy_only=False).astype(np.int64)


def _splits(column_values: pa.Array, file: str, start: int, column: str) -> np.ndarray:
    values = column_values.dictionary_decode() if pa.types.is_dictionary(column_values.type) else column_values
    values = values.cast(pa.string())  # large_string too: is_in wants the value set's type
    _refuse_nulls(values, file, start, f"split in column '{column}'", f"Give every row one of {', '.join(SPLIT_NAMES)}")
    known = pc.is_in(values, value_set=pa.array(SPLIT_NAMES)).to_numpy(zero_copy_only=False)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise InputError(f"row {start + i} of {file} has split {values[i].as_py()!r} in column '{column}', but a "
                         f"split is one of {', '.join(SPLIT_NAMES)}. Rename the split values, or drop --split-column "
                         "to let the preparation split the data")
    return values.to_numpy(zero_copy_only=False).astype(str)


def _groups(column_values: pa.Array, file: str, start: int, column: str) -> np.ndarray:
    values = column_values.dictionary_decode() if pa.types.is_dictionary(column_values.type) else column_values
    _refuse_nulls(values, file, start, f"group in column '{column}'", "Give the row a group, or remove it")
    try:
        text = values.cast(pa.string())
    except (pa.ArrowException, ValueError) as e:
        raise InputError(f"column '{column}' of {file} is {_describe(values.type)}, which cannot be used as a group key "
                         f"({e}); --group-column names a column of strings or numbers (a speaker, a subject)") from None
    return text.to_numpy(zero_copy_only=False).astype(str)
