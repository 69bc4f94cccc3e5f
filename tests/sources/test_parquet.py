"""The Parquet source on real data: the Free Spoken Digit Dataset's MFCCs (3000 recordings, 13 per
step), written to Parquet here in both layouts with small row groups, read back exactly; and broken
copies of it refused with an InputError that names the file and the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from refusals import prepare_ok, prepare_refused

from pipeline.sources.base import InputError, check_cases
from pipeline.sources.parquet import open_parquet

ROW_GROUP = 256
CHANNELS = [f"c{i}" for i in range(13)]


@pytest.fixture(scope="module")
def digits(examples: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.load(examples / "fsdd" / "digits.npz")
    return d["X"], d["lengths"], d["y"]


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _sequences(x: np.ndarray, lengths: np.ndarray, widths: np.ndarray | None = None) -> pa.Array:
    """list<list<float>>: rows of steps; `widths` (values per step) defaults to the feature count."""
    widths = np.full(len(x), x.shape[1]) if widths is None else widths
    flat = x.ravel()[: int(widths.sum())]  # a step made shorter leaves the last values out
    steps = pa.ListArray.from_arrays(_offsets(widths), pa.array(flat))
    return pa.ListArray.from_arrays(_offsets(lengths), steps)


def _channels(x: np.ndarray, lengths: np.ndarray) -> dict[str, pa.Array]:
    return {name: pa.ListArray.from_arrays(_offsets(lengths), pa.array(np.ascontiguousarray(x[:, i])))
            for i, name in enumerate(CHANNELS[: x.shape[1]])}


def _write(path: Path, columns: dict[str, pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=ROW_GROUP)
    return path


def _read_all(source) -> list:
    return [check_cases(c, source.info.features) for c in source.cases()]


def _assert_round_trip(runs: list, x: np.ndarray, lengths: np.ndarray, y: np.ndarray) -> None:
    assert len(runs) > 1 and all(len(r) <= 1024 for r in runs)
    assert np.array_equal(np.concatenate([r.values for r in runs]), x)
    assert np.array_equal(np.concatenate([r.lengths for r in runs]), lengths)
    assert np.array_equal(np.concatenate([r.labels for r in runs]), y)


def test_sequence_layout_round_trips(tmp_path, digits):
    x, lengths, y = digits
    path = _write(tmp_path / "fsdd.parquet", {"mfcc": _sequences(x, lengths), "digit": pa.array(y)})
    source = open_parquet(path, label_column="digit", sequence_column="mfcc")
    info = source.info
    assert (info.name, info.files, info.features, info.dtype) == ("fsdd", [path], 13, np.dtype(np.float32))
    assert info.class_names == [str(i) for i in range(10)] and not info.has_splits
    runs = _read_all(source)
    _assert_round_trip(runs, x, lengths, y)
    ids = np.concatenate([r.where for r in runs])
    assert np.array_equal(ids, np.arange(3000)) and np.array_equal(np.concatenate([r.where for r in runs]), ids)
    assert runs[1].case(0) == f"row {len(runs[0])} of {path}" and runs[0].values.flags.writeable
    assert runs[0].split is None and runs[0].groups is None


def test_channel_layout_with_groups_and_splits(tmp_path, digits):
    x, lengths, y = digits
    splits = np.array(["train", "val", "test"])[np.arange(3000) % 3]
    columns = {**_channels(x, lengths), "y": pa.array(y), "speaker": pa.array(np.arange(3000) % 6),
               "fold": pa.array(splits)}
    path = _write(tmp_path / "fsdd.parquet", columns)
    source = open_parquet(path, "y", channel_columns=CHANNELS, group_column="speaker", split_column="fold", name="digits")
    assert (source.info.name, source.info.features, source.info.has_splits) == ("digits", 13, True)
    runs = _read_all(source)
    _assert_round_trip(runs, x, lengths, y)
    assert np.array_equal(np.concatenate([r.split for r in runs]), splits)
    assert list(np.concatenate([r.groups for r in runs])) == [str(i % 6) for i in range(3000)]


def test_directory_of_files_in_name_order(tmp_path, digits):
    x, lengths, y = digits
    cut, steps = 1700, int(lengths[:1700].sum())
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "part-1.parquet", {"x": _sequences(x[steps:], lengths[cut:]), "y": pa.array(y[cut:])})
    _write(tmp_path / "d" / "part-0.parquet", {"x": _sequences(x[:steps], lengths[:cut]), "y": pa.array(y[:cut])})
    source = open_parquet(tmp_path / "d", "y", sequence_column="x")
    assert source.info.name == "d" and [p.name for p in source.info.files] == ["part-0.parquet", "part-1.parquet"]
    runs = _read_all(source)
    _assert_round_trip(runs, x, lengths, y)
    ids = np.concatenate([r.where for r in runs])
    assert np.array_equal(ids, np.concatenate([np.arange(cut), np.arange(3000 - cut)]))
    assert {r.file for r in runs} == {str(p) for p in source.info.files}


def test_labels_strings_and_integers_sorted_as_such(tmp_path, digits):
    x, lengths, y = digits
    words = np.array("zero one two three four five six seven eight nine".split())
    path = _write(tmp_path / "w.parquet", {"x": _sequences(x, lengths), "word": pa.array(words[y]), "n": pa.array(y * 5)})
    by_word = open_parquet(path, "word", sequence_column="x")
    assert by_word.info.class_names == sorted(words)
    labels = np.concatenate([r.labels for r in by_word.cases()])
    assert [by_word.info.class_names[i] for i in labels] == list(words[y])
    by_number = open_parquet(path, "n", sequence_column="x")
    assert by_number.info.class_names == [str(5 * i) for i in range(10)]  # numerically: "5" before "10"
    assert np.array_equal(np.concatenate([r.labels for r in by_number.cases()]), y)


@pytest.mark.parametrize("stored, kept", [(np.float64, np.float32), (np.float16, np.float16)])
def test_value_dtypes(tmp_path, digits, stored, kept):
    x, lengths, y = digits
    path = _write(tmp_path / "v.parquet", {"x": _sequences(x.astype(stored), lengths), "y": pa.array(y)})
    source = open_parquet(path, "y", sequence_column="x")
    assert source.info.dtype == kept
    runs = list(source.cases())
    assert all(r.values.dtype == kept for r in runs)
    _assert_round_trip(runs, x.astype(stored).astype(kept), lengths, y)


def test_large_row_groups_are_noted(tmp_path, digits, monkeypatch):
    import pipeline.sources.parquet as parquet

    x, lengths, y = digits
    path = _write(tmp_path / "big.parquet", {"x": _sequences(x, lengths), "y": pa.array(y)})
    assert open_parquet(path, "y", sequence_column="x").info.notes == []
    monkeypatch.setattr(parquet, "_LARGE_ROW_GROUP", 1 << 20)  # ours are ~0.3 MiB of values; say 1 MiB is large
    pq.write_table(pa.table({"x": _sequences(x, lengths), "y": pa.array(y)}), path)  # one row group of 3000 rows
    (note,) = open_parquet(path, "y", sequence_column="x").info.notes
    assert str(path) in note and "smaller row groups" in note


def test_unlabelled_cases_where_labels_are_optional(tmp_path, digits):
    """FSDD written without its labels reads back exactly in both layouts, every label -1."""
    x, lengths, _ = digits
    unlabelled = np.full(len(lengths), -1)
    path = _write(tmp_path / "fsdd.parquet", {"mfcc": _sequences(x, lengths)})
    source = open_parquet(path, label_column=None, sequence_column="mfcc", labels_required=False)
    info = source.info
    assert (info.name, info.features, info.dtype, info.class_names, info.has_splits) == ("fsdd", 13, np.float32, [], False)
    runs = _read_all(source)
    _assert_round_trip(runs, x, lengths, unlabelled)
    assert np.array_equal(np.concatenate([r.where for r in runs]), np.arange(3000))
    splits = np.array(["train", "val", "test"])[np.arange(3000) % 3]
    path = _write(tmp_path / "channels.parquet", {**_channels(x, lengths), "speaker": pa.array(np.arange(3000) % 6),
                                                  "fold": pa.array(splits)})
    source = open_parquet(path, channel_columns=CHANNELS, group_column="speaker", split_column="fold",
                          labels_required=False)
    assert source.info.class_names == [] and source.info.has_splits
    runs = _read_all(source)
    _assert_round_trip(runs, x, lengths, unlabelled)
    assert np.array_equal(np.concatenate([r.split for r in runs]), splits)


def test_label_column_read_as_ever_where_labels_are_optional(tmp_path, digits):
    x, lengths, y = digits
    path = _write(tmp_path / "fsdd.parquet", {"mfcc": _sequences(x, lengths), "digit": pa.array(y)})
    source = open_parquet(path, "digit", sequence_column="mfcc", labels_required=False)
    assert source.info.class_names == [str(i) for i in range(10)]
    _assert_round_trip(_read_all(source), x, lengths, y)


def test_unlabelled_needs_labels_optional_and_keeps_its_checks(tmp_path, digits):
    x, lengths, _ = digits
    path = _write(tmp_path / "fsdd.parquet", {"mfcc": _sequences(x, lengths)})
    for kwargs in ({}, {"label_column": None}, {"labels_required": True}):
        msg = _refused(path, sequence_column="mfcc", **kwargs)
        assert str(path) in msg and "--label-column" in msg
    msg = _refused(path, sequence_column="x", labels_required=False)
    assert "no column 'x'" in msg and "--sequence-column" in msg
    broken = _write(tmp_path / "null.parquet", {"mfcc": pa.array([[[1.0] * 13], None], pa.list_(pa.list_(pa.float64())))})
    assert f"row 1 of {broken} has a missing (null) sequence" in _refused(broken, sequence_column="mfcc",
                                                                         labels_required=False)
    empty = _write(tmp_path / "empty.parquet", {k: v[:0] for k, v in _channels(x, lengths).items()})
    assert "hold no rows" in _refused(empty, channel_columns=CHANNELS, labels_required=False)


def _refused(*args, **kwargs) -> str:
    with pytest.raises(InputError) as e:
        source = open_parquet(*args, **kwargs)
        _read_all(source)
    return str(e.value)


def test_missing_columns_name_the_flag(tmp_path, digits):
    x, lengths, y = digits
    path = _write(tmp_path / "a.parquet", {"x": _sequences(x, lengths), "label": pa.array(y)})
    msg = _refused(path, "y", sequence_column="x")
    assert str(path) in msg and "no column 'y'" in msg and "x, label" in msg and "--label-column" in msg
    msg = _refused(path, "label", sequence_column="mfcc")
    assert "no column 'mfcc'" in msg and "--sequence-column" in msg
    msg = _refused(path, "label", channel_columns=CHANNELS)
    assert "no column 'c0'" in msg and "--channel-columns" in msg


def test_layout_flags_neither_or_both(tmp_path, digits):
    x, lengths, y = digits
    path = _write(tmp_path / "a.parquet", {"x": _sequences(x, lengths), "y": pa.array(y)})
    assert "neither of --sequence-column and --channel-columns" in _refused(path, "y")
    assert "both of" in _refused(path, "y", sequence_column="x", channel_columns=["x"])


def test_mistyped_columns_say_what_they_are(tmp_path, digits):
    x, lengths, y = digits
    path = _write(tmp_path / "c.parquet", {**_channels(x, lengths), "y": pa.array(y), "x": _sequences(x, lengths),
                                           "name": pa.array([f"r{i}" for i in range(3000)])})
    msg = _refused(path, "y", sequence_column="c0")
    assert str(path) in msg and "is list<float>" in msg and "list<list<float>>" in msg and "--channel-columns" in msg
    msg = _refused(path, "y", channel_columns=["x"])
    assert "is list<list<float>>" in msg and "--sequence-column x" in msg
    assert "is string" in _refused(path, "y", sequence_column="name")
    assert "label column holds integers or strings" in _refused(path, "x", sequence_column="x")


def test_step_of_other_feature_count_names_the_row(tmp_path, digits):
    x, lengths, y = digits
    row, step = 1700, 5
    widths = np.full(len(x), 13)
    widths[int(lengths[:row].sum()) + step] = 12
    path = _write(tmp_path / "short-step.parquet", {"x": _sequences(x, lengths, widths), "y": pa.array(y)})
    msg = _refused(path, "y", sequence_column="x")
    assert f"row {row} of {path}" in msg and f"(step {step}) of 12 features" in msg and "have 13" in msg


def test_channels_of_unequal_length_name_the_row_and_lengths(tmp_path, digits):
    x, lengths, y = digits
    row = 2222
    columns = {**_channels(x, lengths), "y": pa.array(y)}
    short = lengths.copy()
    short[row] -= 1
    drop = int(lengths[: row + 1].sum()) - 1  # the row's last value of channel 3
    columns["c3"] = pa.ListArray.from_arrays(_offsets(short), pa.array(np.delete(x[:, 3], drop)))
    path = _write(tmp_path / "short-channel.parquet", columns)
    msg = _refused(path, "y", channel_columns=CHANNELS)
    n = int(lengths[row])
    assert f"row {row} of {path}" in msg and f"c2: {n}, c3: {n - 1}, c4: {n}" in msg and "'c3'" in msg


def test_files_with_other_channels_or_features(tmp_path, digits):
    x, lengths, y = digits
    half, steps = 1500, int(lengths[:1500].sum())
    (tmp_path / "ch").mkdir()
    _write(tmp_path / "ch" / "a.parquet", {**_channels(x[:steps], lengths[:half]), "y": pa.array(y[:half])})
    b = _write(tmp_path / "ch" / "b.parquet", {**_channels(x[steps:, :12], lengths[half:]), "y": pa.array(y[half:])})
    msg = _refused(tmp_path / "ch", "y", channel_columns=CHANNELS)
    assert f"{b} has no column 'c12'" in msg and "a.parquet" in msg and "--channel-columns" in msg
    (tmp_path / "seq").mkdir()
    a = _write(tmp_path / "seq" / "a.parquet", {"x": _sequences(x[:steps], lengths[:half]), "y": pa.array(y[:half])})
    b = _write(tmp_path / "seq" / "b.parquet", {"x": _sequences(x[steps:, :12], lengths[half:]), "y": pa.array(y[half:])})
    msg = _refused(tmp_path / "seq", "y", sequence_column="x")
    assert f"row 0 of {b} has steps of 12 features" in msg and f"row 0 of {a} has 13" in msg


def test_schemas_that_differ_between_files(tmp_path, digits):
    x, lengths, y = digits
    steps = int(lengths[:1500].sum())
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.parquet", {"x": _sequences(x[:steps], lengths[:1500]), "y": pa.array(y[:1500])})
    b = _write(tmp_path / "d" / "b.parquet", {"x": _sequences(x[steps:], lengths[1500:]), "y": pa.array(y[1500:].astype(str))})
    msg = _refused(tmp_path / "d", "y", sequence_column="x")
    assert f"column 'y' is string in {b} but int64 in" in msg


def test_nulls_name_the_row(tmp_path, digits):
    x, lengths, y = digits
    labels = pa.array(y, mask=np.arange(3000) == 1234)
    path = _write(tmp_path / "null-label.parquet", {"x": _sequences(x, lengths), "y": labels})
    assert f"row 1234 of {path} has a missing (null) label" in _refused(path, "y", sequence_column="x")
    values = pa.array(x.ravel(), mask=np.arange(x.size) == int(lengths[:2900].sum()) * 13 + 20)
    steps = pa.ListArray.from_arrays(_offsets(np.full(len(x), 13)), values)
    path = _write(tmp_path / "null-value.parquet", {"x": pa.ListArray.from_arrays(_offsets(lengths), steps), "y": pa.array(y)})
    assert f"row 2900 of {path} has a missing (null) value" in _refused(path, "y", sequence_column="x")
    rows = pa.ListArray.from_arrays(_offsets(lengths), _sequences(x, lengths).flatten(),
                                    mask=pa.array(np.arange(3000) == 77))
    path = _write(tmp_path / "null-row.parquet", {"x": rows, "y": pa.array(y)})
    assert f"row 77 of {path} has a missing (null) sequence" in _refused(path, "y", sequence_column="x")


def test_bad_split_value_names_the_row(tmp_path, digits):
    x, lengths, y = digits
    splits = np.array(["train"] * 3000, dtype=object)
    splits[2500] = "validation"
    path = _write(tmp_path / "s.parquet", {"x": _sequences(x, lengths), "y": pa.array(y), "split": pa.array(splits)})
    msg = _refused(path, "y", sequence_column="x", split_column="split")
    assert f"row 2500 of {path} has split 'validation'" in msg and "train, val, test" in msg


def test_not_parquet_truncated_or_absent(tmp_path, digits, examples):
    fake = tmp_path / "digits.parquet"
    fake.write_bytes((examples / "fsdd" / "digits.npz").read_bytes())
    msg = _refused(fake, "y", sequence_column="x")
    assert f"{fake} cannot be read as a Parquet file" in msg
    x, lengths, y = digits
    whole = _write(tmp_path / "whole.parquet", {"x": _sequences(x, lengths), "y": pa.array(y)}).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole[: len(whole) // 2])
    assert f"{cut} cannot be read as a Parquet file" in _refused(cut, "y", sequence_column="x")
    assert "does not exist" in _refused(tmp_path / "nope.parquet", "y", sequence_column="x")
    (tmp_path / "empty").mkdir()
    assert "without *.parquet files" in _refused(tmp_path / "empty", "y", sequence_column="x")


def test_damaged_page_names_the_file_and_rows(tmp_path, digits):
    x, lengths, y = digits
    path = _write(tmp_path / "damaged.parquet", {"x": _sequences(x, lengths), "y": pa.array(y)})
    chunk = pq.ParquetFile(path).metadata.row_group(5).column(0)  # rows 1280-1535 of x's values
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset: chunk.data_page_offset + 16] = b"\xff" * 16  # the page header: unreadable
    path.write_bytes(bytes(data))
    msg = _refused(path, "y", sequence_column="x")
    assert f"{path} could not be read at row 1280 or after" in msg and "damaged" in msg


def test_files_beside_the_parquet_files_are_named_not_ignored(tmp_path, digits):
    """An .npz, a .csv and a partition's subdirectory beside a directory's .parquet files are not read: the
    preparation says so. What Spark and Arrow write there (_SUCCESS, _metadata, .crc files) passes quietly."""
    x, lengths, y = digits
    directory = tmp_path / "digits"
    directory.mkdir()
    _write(directory / "part-00000.parquet", {"x": _sequences(x, lengths), "y": pa.array(y)})
    np.savez(directory / "more.npz", X=x[:100], lengths=np.full(10, 10), y=y[:10])
    (directory / "labels.csv").write_text("y\n5\n")
    (directory / "speaker=jackson").mkdir()
    for quiet in ("_SUCCESS", "_metadata", "_common_metadata", ".part-00000.parquet.crc"):
        (directory / quiet).write_bytes(b"")
    stdout = prepare_ok(["--from", str(directory), "--label-column", "y", "--sequence-column", "x"], tmp_path / "out")
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and str(directory) in notes[0], stdout
    assert "3 entr(ies) that are not read (labels.csv, more.npz, speaker=jackson/)" in notes[0], notes[0]
    assert not any(quiet in notes[0] for quiet in ("_SUCCESS", "_metadata", ".crc"))


def test_float64_beyond_float32_is_not_called_infinite(tmp_path, digits):
    x, lengths, y = digits
    wide = x.astype(np.float64)
    wide[int(lengths[:1234].sum()) + 3, 7] = -1e300
    path = _write(tmp_path / "wide.parquet", {"x": _sequences(wide, lengths), "y": pa.array(y)})
    message = prepare_refused(["--from", str(path), "--label-column", "y", "--sequence-column", "x"], tmp_path / "out",
                              f"row 1234 of {path}", "-1e+300", "step 3, channel 7", "beyond the range of float32")
    assert "infinite" not in message
