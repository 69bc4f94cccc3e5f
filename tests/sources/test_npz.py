"""The `.npz` source (pipeline/sources/npz.py) through `prepare_data.py`, on cases of the real Free Spoken
Digit Dataset (the `fsdd` fixture) saved here with one thing wrong: every bad file is refused with one
paragraph naming the file and the case, before anything is allocated or written; nothing is misnamed."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy
from refusals import prepare_ok, prepare_refused

from pipeline.sources import npz
from pipeline.sources.base import InputError

CASES = 200  # the first 200 recordings: every digit, and fast


@pytest.fixture(scope="module")
def digits(fsdd) -> dict[str, np.ndarray]:
    lengths = fsdd["lengths"][:CASES]
    return {"X": fsdd["X"][: int(lengths.sum())], "lengths": lengths, "y": fsdd["y"][:CASES]}


def _saved(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "digits.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


@pytest.mark.parametrize("layout", ["ragged", "fixed"])
def test_steps_of_no_features_are_refused(digits, tmp_path, layout):
    if layout == "ragged":
        arrays = {**digits, "X": digits["X"][:, :0]}  # [sum T, 0]
        shape = f"({len(digits['X'])}, 0)"
    else:
        arrays = {"X": np.zeros((CASES, 12, 0), np.float32), "y": digits["y"]}  # [N, T, 0]
        shape = f"({CASES}, 12, 0)"
    path = _saved(tmp_path, arrays)
    prepare_refused(["--from", str(path)], tmp_path / "out", str(path), f"X is shaped {shape}", "0 features")


def _with_header(path: Path, name: str, shape: tuple[int, ...], arrays: dict[str, np.ndarray]) -> Path:
    """An .npz of `arrays` whose member `name` declares `shape` in its .npy header but holds a few bytes."""
    member = io.BytesIO()
    npy.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
    member.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.npy", member.getvalue())
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    return path


def test_an_enormous_declared_shape_is_refused_before_allocating(digits, tmp_path):
    path = _with_header(tmp_path / "huge.npz", "X", (10**9, 10**4), {"lengths": digits["lengths"], "y": digits["y"]})
    prepare_refused(["--from", str(path)], tmp_path / "out", str(path), "array 'X' declares shape (1000000000, 10000)",
                    "36.4 TiB", "damaged")


def test_arrays_larger_than_the_memory_available_are_refused(digits, tmp_path, monkeypatch):
    """numpy reads an .npz whole: arrays beyond the memory available are refused, naming the largest."""
    path = _saved(tmp_path, digits)
    monkeypatch.setattr(npz, "_available_memory", lambda: 1 << 16)  # the arrays: about 200 KiB
    with pytest.raises(InputError) as err:
        npz.open_npz(path)
    assert str(path) in str(err.value) and f"'X' shaped {digits['X'].shape}" in str(err.value)
    assert "64.0 KiB of memory available" in str(err.value) and "Parquet" in str(err.value)


@pytest.mark.parametrize("kind", ["text", "npy", "zip"])
def test_a_file_that_is_not_an_npz_is_called_so(digits, tmp_path, kind):
    path = tmp_path / "digits.npz"
    if kind == "text":
        path.write_text("5,3,1,2\n4,3,4,3\n")
        needle = "is not a NumPy .npz archive"
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, digits["X"])
        needle = "is a single .npy array (numpy.save), not an .npz archive"
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("digits.csv", "5,3,1,2\n")
        needle = "its member 'digits.csv' is not a .npy array"
    message = prepare_refused(["--from", str(path)], tmp_path / "out", str(path), needle, "numpy.savez")
    assert "pickle" not in message


def test_python_objects_are_still_called_so(digits, tmp_path):
    path = _saved(tmp_path, {**digits, "classes": np.array([str(d) for d in range(10)], dtype=object)})
    prepare_refused(["--from", str(path)], tmp_path / "out", str(path), "array 'classes' holds Python objects")


def test_float64_beyond_float32_is_not_called_infinite(digits, tmp_path):
    x = digits["X"].astype(np.float64)
    x[_starts(digits["lengths"])[7] + 2, 4] = 1e300
    path = _saved(tmp_path, {**digits, "X": x})
    message = prepare_refused(["--from", str(path)], tmp_path / "out", f"index 7 of {path}", "1e+300", "step 2, channel 4",
                              "beyond the range of float32")
    assert "infinite" not in message


def test_a_negative_length_is_said_as_it_is(digits, tmp_path):
    lengths = digits["lengths"].copy()
    lengths[4] += lengths[3] + 1  # the rows still add up: only the lengths are wrong
    lengths[3] = -1
    path = _saved(tmp_path, {**digits, "lengths": lengths})
    message = prepare_refused(["--from", str(path)], tmp_path / "out", f"index 3 of {path}", "has length -1")
    assert "is a sequence of length 0" not in message


def test_group_problems_name_the_file(digits, tmp_path):
    one = _saved(tmp_path, {**digits, "groups": np.zeros(CASES, np.int64)}, "one-group.npz")
    prepare_refused(["--from", str(one)], tmp_path / "out", f"{one}: cannot hold out test by groups", "1 group(s)")
    split = np.where(np.arange(CASES) < 150, "train", "test")
    leak = _saved(tmp_path, {**digits, "groups": np.arange(CASES) % 20, "split": split}, "leak.npz")
    prepare_refused(["--from", str(leak)], tmp_path / "out", f"{leak}: group ", "in both the train and test splits")


def test_a_class_with_cases_only_in_test_is_refused(digits, tmp_path):
    split = np.where((digits["y"] == 9) | (np.arange(CASES) % 5 == 0), "test", "train")
    path = _saved(tmp_path, {**digits, "split": split})
    nines = int((digits["y"] == 9).sum())
    prepare_refused(["--from", str(path)], tmp_path / "out", str(path), "class '9' has no case in the train split",
                    f"train 0, val 0, test {nines} cases", "never predict it")


def test_splits_too_small_to_make_are_recorded_as_not_made(fsdd, tmp_path):
    """Two cases of two digits leave nothing to hold out; three leave a test case but no validation one. The
    manifest and the summary say what was made, instead of recording a test split that holds no case."""
    zero, one, another_one = int(np.flatnonzero(fsdd["y"] == 0)[0]), *np.flatnonzero(fsdd["y"] == 1)[:2].tolist()
    starts = _starts(fsdd["lengths"])
    for cases, missing in (([zero, one], ["test", "val"]), ([zero, one, another_one], ["val"])):
        n = len(cases)
        x = np.concatenate([fsdd["X"][starts[i]:starts[i + 1]] for i in cases])
        path = _saved(tmp_path, {"X": x, "lengths": fsdd["lengths"][cases], "y": fsdd["y"][cases]}, f"tiny{n}.npz")
        out = tmp_path / f"out{n}"
        stdout = prepare_ok(["--from", str(path)], out)
        manifest = json.loads((out / "manifest.json").read_text())
        for split in missing:
            assert split not in manifest["splits"]
            assert manifest["splitting"][split]["origin"] == "not_made", manifest["splitting"]
            assert "the only one of its class" in manifest["splitting"][split]["reason"]
            assert f"  {split:<5} none: no case could be held out" in stdout, stdout
        assert all(manifest["splitting"][s]["origin"] == "held_out" for s in manifest["splits"] if s != "train")
