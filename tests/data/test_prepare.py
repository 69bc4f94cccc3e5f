"""Preparing real sequence data sets through `prepare_data.py --from`: contents, splits, statistics,
determinism, and bad input refused with the file and the case named, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_py
from refusals import prepare_refused

from pipeline.data.manifest import load_manifest
from pipeline.data.store import ShardStore, read_blocks


def prepare(*args: str, check: bool = True):
    return run_py("launch/prepare_data.py", *args, check=check)


def read_split(out: Path, split: str) -> dict[int, tuple[np.ndarray, int]]:
    """Sample id -> (values [T, F], label) of every case of a split, read back from the shards."""
    manifest, source, cases = load_manifest(out), ShardStore(str(out)), {}
    for shard in manifest.split(split).shards:
        for block in read_blocks(source, shard):
            ends = np.cumsum(block.lengths)
            for i, (lo, hi) in enumerate(zip(ends - block.lengths, ends, strict=True)):
                cases[int(block.ids[i])] = (block.values[lo:hi], int(block.labels[i]))
    return cases


def test_fsdd_cases_come_back_exactly_with_stratified_splits(fsdd, fsdd_shards):
    manifest = load_manifest(fsdd_shards)
    assert (manifest.dataset, manifest.features, manifest.dtype, manifest.image_shape) == ("fsdd", 13, "float32", None)
    assert manifest.class_names == [str(d) for d in range(10)]
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 2160, "val": 240, "test": 600}
    assert manifest.splits["test"].class_counts == {str(d): 60 for d in range(10)}  # 20% of 300 per digit
    assert manifest.splits["val"].class_counts == {str(d): 24 for d in range(10)}  # 10% of the remaining 240
    starts = np.concatenate([[0], np.cumsum(fsdd["lengths"])])
    seen = set()
    for split in ("train", "val", "test"):
        for i, (values, label) in read_split(fsdd_shards, split).items():
            np.testing.assert_array_equal(values, fsdd["X"][starts[i]:starts[i + 1]])
            assert label == fsdd["y"][i] and i not in seen
            seen.add(i)
    assert seen == set(range(3000))


def test_fsdd_statistics_are_the_train_splits(fsdd, fsdd_shards):
    manifest = load_manifest(fsdd_shards)
    train = np.concatenate([v for v, _ in read_split(fsdd_shards, "train").values()]).astype(np.float64)
    np.testing.assert_allclose(manifest.normalization.mean, train.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(manifest.normalization.std, train.std(axis=0), rtol=1e-9)
    lengths = manifest.splits["train"].lengths
    train_lengths = [len(v) for v, _ in read_split(fsdd_shards, "train").values()]
    assert (lengths.min, lengths.max, lengths.median) == (min(train_lengths), max(train_lengths), float(np.median(train_lengths)))
    assert sum(lengths.histogram.counts) == 2160 and lengths.histogram.edges[0] == lengths.min


def test_the_same_input_gives_byte_identical_shards(examples, fsdd_shards, tmp_path):
    again = tmp_path / "again"
    prepare("--from", str(examples / "fsdd" / "digits.npz"), "--out", str(again), "--name", "fsdd")
    assert (again / "manifest.json").read_bytes() == (fsdd_shards / "manifest.json").read_bytes()
    for tar in (fsdd_shards / "train").glob("*.tar"):
        assert (again / "train" / tar.name).read_bytes() == tar.read_bytes()
    other = tmp_path / "other"
    prepare("--from", str(examples / "fsdd" / "digits.npz"), "--out", str(other), "--name", "fsdd", "--split-seed", "1")
    assert load_manifest(other).fingerprint != load_manifest(fsdd_shards).fingerprint


def test_packing_costs_little_over_the_raw_arrays(fsdd, fsdd_shards):
    """Bytes on disk against the raw arrays (values, a length, a label and an id per case)."""
    on_disk = sum(s.bytes for split in load_manifest(fsdd_shards).splits.values() for s in split.shards)
    raw = fsdd["X"].nbytes + 3000 * (4 + 8 + 8)
    assert on_disk < raw * 1.05, f"{on_disk} bytes on disk for {raw} raw: {(on_disk - raw) / 3000:.0f} bytes per case"


@pytest.mark.parametrize("name,channels,train,test,classes", [
    ("JapaneseVowels", 12, 270, 370, [str(i) for i in range(1, 10)]),
    ("GunPoint", 1, 50, 150, ["1", "2"]),
    ("ItalyPowerDemand", 1, 67, 1029, ["1", "2"]),
    ("PickupGestureWiimoteZ", 1, 50, 50, [str(i) for i in range(1, 11)]),
    ("BasicMotions", 6, 40, 40, ["Standing", "Running", "Walking", "Badminton"]),
])
def test_archive_pairs_keep_their_own_test_split(examples, tmp_path, name, channels, train, test, classes):
    out = tmp_path / name
    proc = prepare("--from", str(examples / name), "--out", str(out))
    manifest = load_manifest(out)
    assert manifest.dataset == name and manifest.features == channels and manifest.class_names == classes
    assert manifest.splitting["test"].origin == "source" and manifest.splits["test"].num_samples == test
    assert manifest.splits["train"].num_samples + manifest.splits["val"].num_samples == train
    assert manifest.validation.from_split == "train" and manifest.validation.size == 0.1
    assert f"{name}_TRAIN.ts" in manifest.sources and f"{name}_TEST.ts" in manifest.sources
    assert "prepared" in proc.stdout


def test_groups_never_span_two_splits(fsdd, tmp_path):
    """FSDD carries no speaker ids; runs of 50 consecutive recordings stand in as groups here."""
    src = tmp_path / "grouped.npz"
    np.savez(src, X=fsdd["X"], lengths=fsdd["lengths"], y=fsdd["y"], groups=np.arange(3000) // 50)
    out = tmp_path / "out"
    prepare("--from", str(src), "--out", str(out))
    manifest = load_manifest(out)
    assert manifest.validation.grouped_by == "group" and manifest.splitting["test"].grouped_by == "group"
    owner = {}
    for split in manifest.splits:
        for i in read_split(out, split):
            assert owner.setdefault(i // 50, split) == split, f"group {i // 50} in {owner[i // 50]} and {split}"
    assert abs(manifest.splits["test"].num_samples - 600) <= 50  # whole groups: near the 20% asked for


def test_a_split_array_gives_the_splits(fsdd, tmp_path):
    split = np.where(np.arange(3000) % 5 == 0, "test", np.where(np.arange(3000) % 5 == 1, "val", "train"))
    src = tmp_path / "split.npz"
    np.savez(src, X=fsdd["X"], lengths=fsdd["lengths"], y=fsdd["y"], split=split)
    out = tmp_path / "out"
    prepare("--from", str(src), "--out", str(out))
    manifest = load_manifest(out)
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 1800, "val": 600, "test": 600}
    assert all(h.origin == "source" for h in manifest.splitting.values())
    assert set(read_split(out, "test")) == set(range(0, 3000, 5))


def test_fixed_length_npz_and_integer_values(tmp_path, fsdd):
    """X [N, T, F] of int16 becomes float32 on purpose; uint8 stays uint8."""
    fixed = np.stack([fsdd["X"][:10].astype(np.int16)] * 40)  # 40 cases of 10 steps
    src = tmp_path / "fixed.npz"
    np.savez(src, X=fixed, y=np.arange(40) % 4, classes=np.array(["a", "b", "c", "d"]))
    prepare("--from", str(src), "--out", str(tmp_path / "out"))
    manifest = load_manifest(tmp_path / "out")
    assert manifest.dtype == "float32" and manifest.class_names == ["a", "b", "c", "d"]
    assert manifest.splits["train"].lengths.min == manifest.splits["train"].lengths.max == 10
    np.savez(src, X=fixed.astype(np.uint8).clip(0, 255), y=np.arange(40) % 4)
    prepare("--from", str(src), "--out", str(tmp_path / "u8"))
    assert load_manifest(tmp_path / "u8").dtype == "uint8"


def _broken_fsdd(fsdd: dict, tmp_path: Path, **changes) -> Path:
    arrays = {**{k: v.copy() for k, v in fsdd.items()}, **changes}
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    return path


def _refused(args: list[str], *needles: str) -> str:
    proc = prepare(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


def test_bad_npz_input_is_refused_naming_the_case(fsdd, tmp_path, fsdd_shards):
    starts = np.concatenate([[0], np.cumsum(fsdd["lengths"])])
    nan = fsdd["X"].copy()
    nan[starts[1234] + 3, 5] = np.nan
    inf = fsdd["X"].copy()
    inf[starts[17], 0] = np.inf
    zero = fsdd["lengths"].copy()
    zero[41] = 0
    zero[42] += fsdd["lengths"][41]
    short = fsdd["lengths"].copy()
    short[-1] -= 1
    kept = tmp_path / "kept"
    shutil.copytree(fsdd_shards, kept)
    before = (kept / "manifest.json").read_bytes()
    out = ["--out", str(kept), "--force"]  # a data set prepared before must survive bad input
    _refused(["--from", str(_broken_fsdd(fsdd, tmp_path, X=nan)), *out], "broken.npz", "index 1234", "missing value",
             "--missing interpolate")
    _refused(["--from", str(_broken_fsdd(fsdd, tmp_path, X=inf)), *out], "index 17", "infinite value")
    _refused(["--from", str(_broken_fsdd(fsdd, tmp_path, lengths=zero)), *out], "index 41", "length 0")
    _refused(["--from", str(_broken_fsdd(fsdd, tmp_path, lengths=short)), *out], "broken.npz", "lengths sum to 53998",
             "53999 rows")
    _refused(["--from", str(_broken_fsdd(fsdd, tmp_path, y=fsdd["y"][:-1])), *out], "broken.npz", "2999 labels")
    assert (kept / "manifest.json").read_bytes() == before and not (kept / ".staging").exists()
    load_manifest(kept)
    fixed = prepare("--from", str(_broken_fsdd(fsdd, tmp_path, X=nan)), "--out", str(tmp_path / "filled"),
                    "--missing", "interpolate")
    assert fixed.returncode == 0


def test_bad_ts_input_and_a_new_directory_is_left_out(examples, tmp_path):
    lines = (examples / "JapaneseVowels" / "JapaneseVowels_TRAIN.ts").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.lower().startswith("@data")) + 1
    lines[first + 9] = lines[first + 9].rsplit(":", 1)[0] + ":10"  # label 10: not declared
    bad = tmp_path / "JapaneseVowels_TRAIN.ts"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "new"
    _refused(["--from", str(bad), "--out", str(out)], str(bad), f"line {first + 10}", "'10'")
    assert not out.exists()


def test_unknown_formats_and_mixed_flags_are_refused(tmp_path, examples):
    (tmp_path / "data.csv").write_text("1,2,3\n")
    _refused(["--from", str(tmp_path / "data.csv"), "--out", str(tmp_path / "o")], "data.csv", ".npz, .ts or .parquet")
    _refused(["--from", str(examples / "JapaneseVowels"), "--out", str(tmp_path / "o"), "--label-column", "y"],
             "Parquet only")
    _refused(["--from", str(examples / "JapaneseVowels"), "--out", str(tmp_path / "o"), "--dataset", "mnist"],
             "--dataset")


def test_parquet_gives_the_same_shards_as_the_npz_it_was_written_from(fsdd, fsdd_shards, tmp_path):
    """FSDD written to Parquet (list<list<float32>>, small row groups) prepares into the npz's shards, byte for byte."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = np.concatenate([[0], np.cumsum(fsdd["lengths"])]).astype(np.int32)
    cases = pa.ListArray.from_arrays(offsets, _steps(fsdd["X"]))
    path = tmp_path / "fsdd.parquet"
    pq.write_table(pa.table({"x": cases, "digit": fsdd["y"]}), path, row_group_size=256)
    out = tmp_path / "pq"
    prepare("--from", str(path), "--out", str(out), "--name", "fsdd", "--label-column", "digit", "--sequence-column", "x")
    for split in ("train", "val", "test"):
        for tar in (fsdd_shards / split).glob("*.tar"):
            assert (out / split / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert list(load_manifest(out).sources) == ["fsdd.parquet"]


def _steps(x: np.ndarray):
    import pyarrow as pa

    return pa.ListArray.from_arrays(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32), pa.array(x.ravel()))


def test_narrowed_on_purpose_to_float16(examples, fsdd, tmp_path):
    out = tmp_path / "half"
    prepare("--from", str(examples / "fsdd" / "digits.npz"), "--out", str(out), "--dtype", "float16")
    assert load_manifest(out).dtype == "float16"
    starts = np.concatenate([[0], np.cumsum(fsdd["lengths"])])
    i, (values, _) = next(iter(read_split(out, "test").items()))
    assert values.dtype == np.float16
    np.testing.assert_array_equal(values, fsdd["X"][starts[i]:starts[i + 1]].astype(np.float16))
    huge = tmp_path / "huge.npz"
    x = fsdd["X"].copy()
    x[starts[7] + 1, 2] = 1e6
    np.savez(huge, X=x, lengths=fsdd["lengths"], y=fsdd["y"])
    _refused(["--from", str(huge), "--out", str(tmp_path / "h"), "--dtype", "float16"], "index 7", "float16's range")


@pytest.mark.parametrize("flag,value,needle", [
    ("--test-size", "nan", "--test-size nan is not a number"),
    ("--test-size", "inf", "--test-size inf is infinite"),
    ("--test-size", "-0.2", "--test-size -0.2 is negative"),
    ("--test-size", "1.5", "--test-size 1.5 is neither a fraction below 1 nor a whole number"),
    ("--test-size", "0.999", "--test-size 0.999 would hold out 200 of the data set's 200 cases, leaving none"),
    ("--test-size", "500", "--test-size 500 would hold out 500 of the data set's 200 cases"),
    ("--val-size", "nan", "--val-size nan is not a number"),
    ("--val-size", "-1", "--val-size -1 is negative"),
    ("--val-size", "160", "--val-size 160 would hold out 160 of the train split's 160 cases"),
])
def test_split_sizes_out_of_range_name_the_flag_and_value(fsdd, tmp_path, flag, value, needle):
    """Sizes are checked where they are interpreted (pipeline/data/splits.py), on 200 real FSDD cases."""
    src = tmp_path / "digits.npz"
    lengths = fsdd["lengths"][:200]
    np.savez(src, X=fsdd["X"][: int(lengths.sum())], lengths=lengths, y=fsdd["y"][:200])
    prepare_refused(["--from", str(src), f"{flag}={value}"], tmp_path / "out", needle, "0 for no such split")
