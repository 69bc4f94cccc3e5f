"""The `.ts` reader (pipeline/sources/ts.py) on the real UEA/UCR archive files (the `examples` fixture),
and on real files with one line broken, written to tmp_path: every bad input is an InputError that
names the file and the line."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from refusals import prepare_refused

from pipeline.sources import ts
from pipeline.sources.base import Cases, InputError, check_cases
from pipeline.sources.ts import find_pair, open_ts

JV_CLASSES = [str(i) for i in range(1, 10)]


def _pair(examples: Path, name: str) -> list[Path]:
    return [examples / name / f"{name}_TRAIN.ts", examples / name / f"{name}_TEST.ts"]


def _read_all(source) -> tuple[list[Cases], Cases]:
    """Every run, and all of them joined into one (for whole-data-set assertions)."""
    runs = list(source.cases())
    joined = {key: np.concatenate([getattr(r, key) for r in runs])
              for key in ("values", "lengths", "labels", "where")}
    split = np.concatenate([r.split for r in runs]) if runs[0].split is not None else None
    return runs, Cases(**joined, file="all", unit="line", split=split)


def _data_line(lines: list[str], k: int = 0) -> int:
    """0-based index into `lines` of the file's k-th case (k 0-based)."""
    first = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
    return [i for i in range(first, len(lines)) if lines[i].strip()][k]


def _fields(line: str) -> tuple[list[list[str]], str]:
    *channels, label = line.split(":")
    return [c.split(",") for c in channels], label


def _join(channels: list[list[str]], label: str) -> str:
    return ":".join(",".join(c) for c in channels) + ":" + label


def _broken(examples: Path, tmp_path: Path, name: str, edit, k: int = 4, split: str = "TRAIN") -> tuple[Path, int]:
    """A real file with its k-th case line edited; the new file and the edited line's 1-based number."""
    lines = (examples / name / f"{name}_{split}.ts").read_text().splitlines()
    i = _data_line(lines, k)
    lines[i] = edit(lines[i])
    path = tmp_path / f"{name}_{split}.ts"
    path.write_text("\n".join(lines) + "\n")
    return path, i + 1


def _refused(paths: list[Path], *needles: str) -> str:
    with pytest.raises(InputError) as err:
        for _ in open_ts(paths).cases():
            pass
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


# ---- the real files --------------------------------------------------------------------------------------


def test_japanese_vowels_pair(examples):
    paths = _pair(examples, "JapaneseVowels")
    source = open_ts(paths)
    info = source.info
    assert (info.name, info.features, info.class_names, info.dtype) == ("JapaneseVowels", 12, JV_CLASSES, np.float32)
    assert info.has_splits and info.files == paths and info.notes == []
    runs, every = _read_all(source)
    assert [r.file for r in runs] == [str(p) for p in paths]
    assert (every.split == "train").sum() == 270 and (every.split == "test").sum() == 370
    assert every.values.shape == (every.lengths.sum(), 12) and every.values.dtype == np.float32
    assert (every.lengths.min(), every.lengths.max()) == (7, 29)
    assert np.bincount(every.labels[:270]).tolist() == [30] * 9  # the training set is balanced: 30 per speaker

    text = paths[0].read_text().splitlines()
    first = _data_line(text)
    assert every.where[0] == first + 1 and runs[0].case(0) == f"line {first + 1} of {paths[0]}"
    assert text[first].startswith("1.860936,1.891651,1.939205,")
    np.testing.assert_array_equal(every.values[:3, 0], np.float32([1.860936, 1.891651, 1.939205]))
    channels, label = _fields(text[first])
    expected = np.array(channels, dtype=np.float32).T
    np.testing.assert_array_equal(every.values[:every.lengths[0]], expected)
    assert JV_CLASSES[every.labels[0]] == label
    for run in runs:
        check_cases(run, 12)  # the preparation's own checks pass too


def test_where_is_the_line_of_each_case(examples):
    path = _pair(examples, "JapaneseVowels")[1]
    lines = path.read_text().splitlines()
    _, every = _read_all(open_ts([path]))
    starts = np.concatenate([[0], np.cumsum(every.lengths)[:-1]])
    for i in (0, 1, 100, 369):
        channels, label = _fields(lines[every.where[i] - 1])
        assert np.float32(channels[5][0]) == every.values[starts[i], 5]
        assert JV_CLASSES[every.labels[i]] == label


def test_japanese_vowels_test_file_is_fast(examples):
    path = _pair(examples, "JapaneseVowels")[1]
    start = time.perf_counter()
    total = sum(len(run) for run in open_ts([path]).cases())
    assert total == 370 and time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name,length,counts", [("GunPoint", 150, (50, 150)), ("ItalyPowerDemand", 24, (67, 1029))])
def test_univariate_fixed_length(examples, name, length, counts):
    source = open_ts(_pair(examples, name))
    assert (source.info.name, source.info.features, source.info.class_names) == (name, 1, ["1", "2"])
    _, every = _read_all(source)
    assert ((every.split == "train").sum(), (every.split == "test").sum()) == counts
    assert (every.lengths == length).all() and every.values.shape == (length * sum(counts), 1)
    assert set(every.labels.tolist()) == {0, 1} and np.isfinite(every.values).all()


def test_variable_length_univariate(examples):
    source = open_ts(_pair(examples, "PickupGestureWiimoteZ"))
    assert source.info.features == 1 and source.info.class_names == [str(i) for i in range(1, 11)]
    _, every = _read_all(source)
    assert len(every) == 100 and every.lengths.min() < every.lengths.max()
    assert np.isfinite(every.values).all()  # the NaN padding the header's comments mention is not in the file


def test_word_labels_kept_as_written(examples):
    paths = _pair(examples, "BasicMotions")
    source = open_ts(paths)
    assert source.info.class_names == ["Standing", "Running", "Walking", "Badminton"] and source.info.features == 6
    runs, every = _read_all(source)
    assert len(every) == 80
    for run, path in zip(runs, paths, strict=True):
        lines = path.read_text().splitlines()
        written = [lines[w - 1].rsplit(":", 1)[1].strip() for w in run.where]
        assert [source.info.class_names[i] for i in run.labels] == written


def test_single_file_has_no_splits(examples):
    source = open_ts([examples / "GunPoint" / "GunPoint_TEST.ts"])
    assert not source.info.has_splits and source.info.name == "GunPoint"
    runs = list(source.cases())
    assert len(runs) == 1 and runs[0].split is None and len(runs[0]) == 150


def test_runs_are_bounded(examples, monkeypatch):
    path = examples / "ItalyPowerDemand" / "ItalyPowerDemand_TEST.ts"
    _, whole = _read_all(open_ts([path]))
    monkeypatch.setattr(ts, "CHUNK_CASES", 100)
    runs, joined = _read_all(open_ts([path]))
    assert [len(r) for r in runs] == [100] * 10 + [29]
    assert len(joined.where) == 1029 and (np.diff(joined.where) >= 1).all()
    np.testing.assert_array_equal(joined.values, whole.values)
    np.testing.assert_array_equal(joined.where, whole.where)


def test_find_pair(examples, tmp_path):
    assert find_pair(examples / "GunPoint") == _pair(examples, "GunPoint")
    for name in ("A_TRAIN.ts", "B_TRAIN.ts", "A_TEST.ts"):
        (tmp_path / name).write_text("")
    with pytest.raises(InputError, match=r"2 \*_TRAIN.ts \(A_TRAIN.ts, B_TRAIN.ts\); 1 \*_TEST.ts"):
        find_pair(tmp_path)
    with pytest.raises(InputError, match="not a directory"):
        find_pair(tmp_path / "A_TEST.ts")


# ---- the format's variants -------------------------------------------------------------------------------


def test_dialects_read_alike(examples, tmp_path):
    """Lower-case tags, % comments, a byte-order mark, Windows line endings, blank lines, trailing
    whitespace and commas: the same cases."""
    original = examples / "GunPoint" / "GunPoint_TRAIN.ts"
    lines = original.read_text().splitlines()
    start = _data_line(lines)
    header = [line.replace(line.split()[0], line.split()[0].lower()) if line.startswith("@") else line
              for line in lines[:start]]
    body = []
    for line in lines[start:]:
        channels, label = _fields(line)
        body += [",".join(channels[0]) + ", :" + label + " \t", ""]
    path = tmp_path / "GunPoint_TRAIN.ts"
    path.write_bytes(("\ufeff% a comment\r\n" + "\r\n".join(header + body) + "\r\n").encode())
    _, plain = _read_all(open_ts([original]))
    source = open_ts([path])
    _, variant = _read_all(source)
    assert source.info.name == "GunPoint" and source.info.class_names == ["1", "2"]
    np.testing.assert_array_equal(variant.values, plain.values)
    np.testing.assert_array_equal(variant.labels, plain.labels)
    assert variant.where[1] - variant.where[0] == 2  # the blank lines count


def test_timestamps_dropped(examples, tmp_path):
    """A JapaneseVowels case written as (timestamp,value) pairs reads as the plain case."""
    source_file = examples / "JapaneseVowels" / "JapaneseVowels_TRAIN.ts"
    lines = source_file.read_text().splitlines()
    channels, label = _fields(lines[_data_line(lines)])
    pairs = [",".join(f"(2020-01-01 00:00:{t:02d},{v})" for t, v in enumerate(c)) for c in channels]
    header = ["@problemName Stamped", "@timeStamps true", "@univariate false", "@dimensions 12",
              "@classLabel true " + " ".join(JV_CLASSES), "@data"]
    path = tmp_path / "Stamped.ts"
    path.write_text("\n".join(header + [":".join(pairs) + ":" + label]) + "\n")
    source = open_ts([path])
    assert any("timestamps" in note for note in source.info.notes)
    (run,) = list(source.cases())
    np.testing.assert_array_equal(run.values, np.array(channels, dtype=np.float32).T)
    assert run.where.tolist() == [7] and JV_CLASSES[run.labels[0]] == label


def test_missing_value_is_nan_for_check_cases(examples, tmp_path):
    def edit(line: str) -> str:
        channels, label = _fields(line)
        channels[2][3] = "?"
        return _join(channels, label)

    path, line_no = _broken(examples, tmp_path, "JapaneseVowels", edit)
    runs = list(open_ts([path]).cases())  # the reader does not refuse '?'
    starts = np.cumsum(runs[0].lengths) - runs[0].lengths
    assert np.isnan(runs[0].values[starts[4] + 3, 2]) and np.isnan(runs[0].values).sum() == 1
    with pytest.raises(InputError, match=f"line {line_no} of {path} holds a missing value"):
        check_cases(runs[0], 12)
    assert np.isfinite(check_cases(runs[0], 12, missing="interpolate").values).all()


# ---- bad input -------------------------------------------------------------------------------------------


def _drop_last(channel: int):
    def edit(line: str) -> str:
        channels, label = _fields(line)
        channels[channel] = channels[channel][:-1]
        return _join(channels, label)
    return edit


def _set_label(new: str):
    return lambda line: line.rsplit(":", 1)[0] + ":" + new


def _set_value(channel: int, index: int, token: str):
    def edit(line: str) -> str:
        channels, label = _fields(line)
        channels[channel][index] = token
        return _join(channels, label)
    return edit


def _drop_channel(line: str) -> str:
    channels, label = _fields(line)
    return _join(channels[:-1], label)


def _empty_channel(line: str) -> str:
    channels, label = _fields(line)
    return ":".join([",".join(channels[0]), ""] + [",".join(c) for c in channels[2:]]) + ":" + label


@pytest.mark.parametrize("edit,needles", [
    (_drop_last(3), ["unequal lengths (21, 21, 21, 20, 21,", "channel 4 has 20 values, channel 1 has 21", "Fix or remove"]),
    (_set_label("Vowel"), ["class label 'Vowel' is not declared", "declared: 1, 2, 3, 4, 5, 6, 7, 8, 9"]),
    (_set_value(1, 2, "abc"), ["'abc' (channel 2, value 3) is not a number"]),
    (_set_value(0, 1, ""), ["an empty value (two commas in a row) (channel 1, value 2)"]),
    (_set_value(11, 0, "1e50"), ["'1e50' (channel 12, value 1) is beyond the range of float32"]),
    (_drop_channel, ["has 11 channel(s), but @dimensions says 12"]),
    (_empty_channel, ["channel 2 of 12 is empty, a sequence of length 0"]),
    (lambda line: line.rsplit(":", 1)[0].replace(":", ";"), ["no ':' before a class label"]),
], ids=["unequal", "label", "word", "empty-value", "overflow", "channels", "length-0", "no-label"])
def test_bad_case_named(examples, tmp_path, edit, needles):
    path, line_no = _broken(examples, tmp_path, "JapaneseVowels", edit)
    _refused([path], f"line {line_no} of {path}:", *needles)


def test_bad_case_in_the_test_file_of_a_pair(examples, tmp_path):
    path, line_no = _broken(examples, tmp_path, "GunPoint", _set_value(0, 149, "1.2.3"), k=120, split="TEST")
    _refused([examples / "GunPoint" / "GunPoint_TRAIN.ts", path], f"line {line_no} of {path}:", "'1.2.3'")


def test_channels_undeclared_follow_the_first_case(examples, tmp_path):
    path, line_no = _broken(examples, tmp_path, "JapaneseVowels", _drop_channel, k=10)
    text = path.read_text().replace("@dimensions 12\n", "")
    path.write_text(text)
    first = _data_line(text.splitlines()) + 1
    assert open_ts([path]).info.features == 12
    _refused([path], f"line {line_no - 1} of {path}:", f"but the first case (line {first}) has 12")


def _header_edit(examples: Path, tmp_path: Path, name: str, edit) -> Path:
    path = tmp_path / f"{name}_TRAIN.ts"
    path.write_text(edit((examples / name / f"{name}_TRAIN.ts").read_text()))
    return path


def test_no_data_line(examples, tmp_path):
    path = _header_edit(examples, tmp_path, "GunPoint", lambda t: t.replace("@data\n", ""))
    _refused([path], f"{path} has no @data line", "line 19 looks like a case")


def test_unlabelled_refused(examples, tmp_path):
    path = _header_edit(examples, tmp_path, "GunPoint", lambda t: t.replace("@classLabel true 1 2", "@classLabel false"))
    _refused([path], f"{path} declares @classLabel false", "nothing to classify")


def _unlabelled_jv(examples: Path, tmp_path: Path, class_label: str | None = "@classLabel false") -> Path:
    """The real JapaneseVowels_TEST.ts unlabelled: its @classLabel line replaced by `class_label` (None: left
    out), each case line without its trailing ':<label>'."""
    lines = (examples / "JapaneseVowels" / "JapaneseVowels_TEST.ts").read_text().splitlines()
    start = _data_line(lines)
    header = [class_label if line.startswith("@classLabel") else line for line in lines[:start]]
    body = [line.rsplit(":", 1)[0] if line.strip() else line for line in lines[start:]]
    path = tmp_path / "JapaneseVowels_TEST.ts"
    path.write_text("\n".join(line for line in header + body if line is not None) + "\n")
    return path


@pytest.mark.parametrize("class_label", ["@classLabel false", None])
def test_unlabelled_read_where_labels_are_optional(examples, tmp_path, class_label):
    labelled = examples / "JapaneseVowels" / "JapaneseVowels_TEST.ts"
    path = _unlabelled_jv(examples, tmp_path, class_label)
    _, plain = _read_all(open_ts([labelled]))
    source = open_ts([path], labels_required=False)
    info = source.info
    assert (info.name, info.features, info.class_names, info.has_splits) == ("JapaneseVowels", 12, [], False)
    runs, every = _read_all(source)
    np.testing.assert_array_equal(every.values, plain.values)
    np.testing.assert_array_equal(every.lengths, plain.lengths)
    np.testing.assert_array_equal(every.where + (class_label is None), plain.where)  # one header line fewer
    assert len(every) == 370 and (every.labels == -1).all() and all(r.split is None for r in runs)
    for run in runs:
        check_cases(run, 12)


def test_unlabelled_still_refused_where_labels_are_required(examples, tmp_path):
    path = _unlabelled_jv(examples, tmp_path)
    _refused([path], f"{path} declares @classLabel false", "nothing to classify")
    path = _unlabelled_jv(examples, tmp_path, None)
    _refused([path], f"{path} has no @classLabel line before @data", "Add '@classLabel true")


def test_labelled_file_keeps_its_labels_where_labels_are_optional(examples):
    path = examples / "JapaneseVowels" / "JapaneseVowels_TEST.ts"
    _, plain = _read_all(open_ts([path]))
    source = open_ts([path], labels_required=False)
    assert source.info.class_names == JV_CLASSES
    _, every = _read_all(source)
    np.testing.assert_array_equal(every.labels, plain.labels)
    np.testing.assert_array_equal(every.values, plain.values)


def test_unlabelled_timestamps_and_pairs(examples, tmp_path):
    """An unlabelled timestamped case reads as the plain one; a labelled file paired with an unlabelled one is refused."""
    lines = (examples / "JapaneseVowels" / "JapaneseVowels_TRAIN.ts").read_text().splitlines()
    channels, _ = _fields(lines[_data_line(lines)])
    pairs = [",".join(f"(2020-01-01 00:00:{t:02d},{v})" for t, v in enumerate(c)) for c in channels]
    path = tmp_path / "Stamped.ts"
    path.write_text("\n".join(["@timeStamps true", "@classLabel false", "@data", ":".join(pairs)]) + "\n")
    (run,) = list(open_ts([path], labels_required=False).cases())
    np.testing.assert_array_equal(run.values, np.array(channels, dtype=np.float32).T)
    assert run.labels.tolist() == [-1] and run.where.tolist() == [4]
    train = examples / "JapaneseVowels" / "JapaneseVowels_TRAIN.ts"
    test = _unlabelled_jv(examples, tmp_path)
    with pytest.raises(InputError, match="must be labelled alike"):
        open_ts([train, test], labels_required=False)


def test_regression_refused(examples, tmp_path):
    """A regression file made from a real one: @targetlabel true and a number after each case."""
    def edit(text: str) -> str:
        lines = text.replace("@classLabel true 1 2", "@targetlabel true").splitlines()
        start = _data_line(lines)
        lines[start:] = [line.rsplit(":", 1)[0] + f":{0.5 * i}" for i, line in enumerate(lines[start:])]
        return "\n".join(lines)
    path = _header_edit(examples, tmp_path, "ItalyPowerDemand", edit)
    _refused([path], f"{path} declares @targetlabel true", "regression targets", "this pipeline trains classifiers")


def test_missing_file(tmp_path):
    _refused([tmp_path / "Nope_TRAIN.ts"], f"{tmp_path / 'Nope_TRAIN.ts'} does not exist")


def test_pair_with_other_classes(examples, tmp_path):
    test = tmp_path / "GunPoint_TEST.ts"
    test.write_text((examples / "GunPoint" / "GunPoint_TEST.ts").read_text().replace("@classLabel true 1 2", "@classLabel true 1 2 3"))
    train = examples / "GunPoint" / "GunPoint_TRAIN.ts"
    _refused([train, test], f"{train} and {test} declare different classes (1 2 and 1 2 3)")


def test_a_class_the_train_file_lacks_is_refused(examples, tmp_path):
    """JapaneseVowels_TRAIN.ts cut short before its 30 cases of class 9 (the file lists them last): the TEST
    file's class 9 cases could never be predicted, so the pair is refused, naming the class and the counts."""
    pair = tmp_path / "JapaneseVowels"
    pair.mkdir()
    train, test = _pair(examples, "JapaneseVowels")
    lines = train.read_text().splitlines()
    assert all(lines[_data_line(lines, k)].endswith(":9") for k in range(240, 270))
    (pair / train.name).write_text("\n".join(lines[:_data_line(lines, 240)]) + "\n")
    (pair / test.name).write_text(test.read_text())
    nines = sum(line.endswith(":9") for line in test.read_text().splitlines())
    prepare_refused(["--from", str(pair)], tmp_path / "out", str(pair / train.name), str(pair / test.name),
                    "class '9' has no case in the train split", f"train 0, val 0, test {nines} cases")


def test_pair_with_other_channels(examples, tmp_path):
    test = tmp_path / "BasicMotions_TEST.ts"
    test.write_text((examples / "BasicMotions" / "BasicMotions_TEST.ts").read_text().replace("@dimensions 6", "@dimensions 5"))
    train = examples / "BasicMotions" / "BasicMotions_TRAIN.ts"
    _refused([train, test], f"{train} and {test} have different channels", "@dimensions says 6", "@dimensions says 5")


def test_no_edit_lets_another_error_escape(examples, tmp_path):
    """Random one-character edits of a real file's cases: each reads, or is an InputError naming the file."""
    lines = (examples / "BasicMotions" / "BasicMotions_TRAIN.ts").read_text().splitlines()
    start = _data_line(lines)
    lines = lines[:start + 4]
    rng = random.Random(0)
    path = tmp_path / "BasicMotions_TRAIN.ts"
    refused = 0
    for _ in range(300):
        edited = list(lines)
        i = rng.randrange(start - 3, len(lines))
        at = rng.randrange(len(edited[i]) + 1)
        edited[i] = edited[i][:at] + rng.choice(":,()?@x# \t-e.") + edited[i][at:]
        path.write_text("\n".join(edited) + "\n")
        try:
            for run in open_ts([path]).cases():
                assert run.values.dtype == np.float32
        except InputError as err:
            refused += 1
            assert str(path) in str(err) and "\n" not in str(err), str(err)
    assert refused > 50
