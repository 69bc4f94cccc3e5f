"""Shards and manifest from the real Fashion-MNIST: exact content, verify, determinism, re-runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_py

from pipeline.data import splits
from pipeline.data.manifest import Manifest, load_manifest, manifest_json_schema
from pipeline.data.store import ShardStore, read_blocks
from pipeline.errors import DataError
from pipeline.sources import idx as sources


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_shards_reproduce_idx_exactly(fashion_shards, fashion_idx):
    """Train and val together hold the train file, each sample once; test holds the test file. Sample ids
    are positions in the source: the train file's images, then the test file's."""
    manifest = load_manifest(fashion_shards)
    _, paths = sources.locate("fashion_mnist", fashion_idx)
    src = ShardStore(str(fashion_shards))
    for source_split, names, first, n in (("train", ("train", "val"), 0, 60000), ("test", ("test",), 60000, 10000)):
        truth = sources.load_split(paths, source_split, 10)
        seen = np.zeros(n, dtype=np.int64)
        for split in names:
            for shard in manifest.split(split).shards:
                for block in read_blocks(src, shard):
                    idx = block.ids - first
                    assert (block.lengths == 28).all()
                    np.testing.assert_array_equal(block.values.reshape(len(block), 28, 28), truth.images[idx])
                    np.testing.assert_array_equal(block.labels, truth.labels[idx])
                    seen[idx] += 1
        assert (seen == 1).all(), f"every {source_split} sample exactly once, in one split"
        assert sum(manifest.split(split).num_samples for split in names) == n


def test_the_validation_split_is_held_out_of_train_stratified_and_recorded(fashion_shards, fashion_idx):
    manifest = load_manifest(fashion_shards)
    assert manifest.validation.model_dump() == {"origin": "held_out", "from_split": "train", "size": 5000, "seed": 0,
                                                 "stratified_by": "label", "grouped_by": None}
    assert manifest.splitting["test"].origin == "source"
    src = ShardStore(str(fashion_shards))
    ids = {split: np.concatenate([b.ids for s in manifest.split(split).shards for b in read_blocks(src, s)])
           for split in ("train", "val")}
    labels = np.concatenate([b.labels for s in manifest.split("val").shards for b in read_blocks(src, s)])
    assert len(ids["val"]) == 5000 and len(ids["train"]) == 55000 and not set(ids["val"]) & set(ids["train"])
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10  # the train file's class shares, exactly
    truth = sources.load_split(sources.locate("fashion_mnist", fashion_idx)[1], "train", 10)
    again = splits.hold_out(truth.labels, 5000, 0)
    np.testing.assert_array_equal(np.sort(ids["val"]), again)  # the seed fixes the choice
    assert not np.array_equal(again, splits.hold_out(truth.labels, 5000, 1))


def test_a_dataset_without_a_validation_split_trains_on_test_with_a_warning(tmp_path, fashion_idx):
    out = tmp_path / "old"
    run_py("launch/prepare_data.py", "--out", str(out), "--source", str(fashion_idx), "--val-size", "0", check=True)
    manifest = load_manifest(out)
    assert "val" not in manifest.splits and manifest.validation is None and manifest.split("train").num_samples == 60000
    proc = run_py("launch/train.py", "--config", "configs/cpu_test.yaml", f"data.dir={out}", f"output_dir={tmp_path / 'run'}",
                  "train.max_steps=20", "eval.every_steps=10", "wandb.mode=disabled", "train.progress_bar=false",
                  "train.device=cpu", check=True)
    assert "prepared without a validation split, so training evaluates on test" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_split"] == "test" and summary["test_accuracy"] == summary["final_eval_accuracy"]


def test_manifest_contents_and_schema(fashion_shards):
    raw = json.loads((fashion_shards / "manifest.json").read_text())
    Manifest.model_validate(raw)  # strict: extra keys are rejected
    schema = manifest_json_schema()
    assert set(schema["required"]) >= {"dataset", "features", "dtype", "class_names", "normalization", "sources",
                                       "fingerprint", "splits"}
    assert raw["dataset"] == "fashion_mnist" and raw["image_shape"] == [28, 28] and raw["dtype"] == "uint8"
    assert raw["features"] == 28 and raw["class_names"][9] == "Ankle boot"
    assert set(raw["splits"]) == {"train", "val", "test"}
    assert raw["splits"]["test"]["class_counts"] == {name: 1000 for name in raw["class_names"]}
    assert raw["splits"]["train"]["lengths"] == {"min": 28, "median": 28.0, "max": 28,
                                                 "histogram": {"edges": [28.0, 29.0], "counts": [55000]}}
    # per column of pixels, over the train split's rows: the edge columns are nearly empty
    mean = raw["normalization"]["mean"]
    assert len(mean) == 28 and mean[0] < 5 < mean[14] and raw["normalization"]["split"] == "train"
    for shard in raw["splits"]["train"]["shards"]:
        assert not Path(shard["url"]).is_absolute() and shard["url"].startswith("train/")
        data = (fashion_shards / shard["url"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert set(raw["sources"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}


def test_packed_records_are_compact(fashion_shards):
    """Bytes on disk against the raw arrays (784 pixels, a label and an id per image): one tar header per
    array of a 256-sample block, about 28 bytes per sample (the version before sequences: 19)."""
    total = sum(p.stat().st_size for p in (fashion_shards / "train").glob("*.tar"))
    raw = 55000 * (784 + 8 + 8)
    assert total < raw + 55000 * 32, f"{total} bytes: {(total - raw) / 55000:.1f} bytes per sample over the raw arrays"


def test_deterministic_prepare(tmp_path, fashion_shards, fashion_idx):
    again = tmp_path / "again"
    run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(again), "--source", str(fashion_idx), check=True)
    assert (again / "manifest.json").read_bytes() == (fashion_shards / "manifest.json").read_bytes()


def test_verify_clean(fashion_shards):
    proc = run_py("launch/prepare_data.py", "--verify", str(fashion_shards))
    assert proc.returncode == 0, proc.stderr
    assert "all shards" in proc.stdout


def test_verify_names_flipped_byte(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "d")
    victim = data / "train" / "train-00007.tar"
    raw = bytearray(victim.read_bytes())
    raw[5000] ^= 0xFF
    victim.write_bytes(bytes(raw))
    proc = run_py("launch/prepare_data.py", "--verify", str(data))
    assert proc.returncode == 1
    bad = [line for line in proc.stderr.splitlines() if line.startswith(str(data))]
    assert len(bad) == 1 and "train-00007.tar" in bad[0] and "sha256" in bad[0]
    assert "Traceback" not in proc.stderr


def test_verify_truncated_and_missing(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "d")
    victim = data / "test" / "test-00003.tar"
    victim.write_bytes(victim.read_bytes()[:7000])
    (data / "train" / "train-00011.tar").unlink()
    proc = run_py("launch/prepare_data.py", "--verify", str(data))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "test-00003.tar: size 7000 bytes" in proc.stderr
    assert "train-00011.tar: missing" in proc.stderr


def test_truncated_shard_read_error_names_shard(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "d")
    victim = data / "train" / "train-00002.tar"
    victim.write_bytes(victim.read_bytes()[:9000])
    manifest = load_manifest(data)
    with pytest.raises(DataError, match="train-00002.tar"):
        for _ in read_blocks(ShardStore(str(data)), manifest.split("train").shards[2]):
            pass


def test_rerun_is_noop_and_force_rebuilds(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "d")
    stamp = (data / "manifest.json").stat().st_mtime_ns
    proc = run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(data), check=True)
    assert "already holds a complete" in proc.stdout
    assert (data / "manifest.json").stat().st_mtime_ns == stamp
    proc = run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(data), "--force", check=True)
    assert "prepared fashion_mnist" in proc.stdout
    assert (data / "manifest.json").read_bytes() == (fashion_shards / "manifest.json").read_bytes()


def test_interrupted_run_is_rebuilt(tmp_path, fashion_shards):
    data = _copy(fashion_shards, tmp_path / "d")
    (data / "manifest.json").unlink()  # as if killed before the manifest was written
    (data / "train" / "train-00000.tar").write_bytes(b"half a shard")
    (data / "train" / "train-00001.tar.tmp").write_bytes(b"temp")
    run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(data), check=True)
    assert (data / "manifest.json").read_bytes() == (fashion_shards / "manifest.json").read_bytes()
    assert not (data / "train" / "train-00001.tar.tmp").exists()


def test_foreign_files_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    proc = run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(out))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "thesis.tex" in proc.stderr
    assert (out / "thesis.tex").read_text() == "precious"


def test_prepare_via_download(tmp_path, fashion_shards, mirror_url):
    out = tmp_path / "dl"
    proc = run_py("launch/prepare_data.py", "--dataset", "fashion_mnist", "--out", str(out), "--download",
                  "--download-dir", str(tmp_path / "cache"), "--mirror", mirror_url, check=True)
    assert "prepared" in proc.stdout
    assert (out / "manifest.json").read_bytes() == (fashion_shards / "manifest.json").read_bytes()


def test_missing_manifest_error_says_command(tmp_path):
    with pytest.raises(DataError, match=r"python launch/prepare_data.py --dataset fashion_mnist --out"):
        load_manifest(tmp_path)
