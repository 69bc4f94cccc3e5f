"""Shards and manifest from the real Fashion-MNIST: exact content, verify, determinism, re-runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_py

from pipeline.data import sources
from pipeline.data.manifest import Manifest, load_manifest, manifest_json_schema
from pipeline.data.stream import ShardSource, read_blocks
from pipeline.errors import DataError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_shards_reproduce_idx_exactly(fashion_shards, fashion_idx):
    manifest = load_manifest(fashion_shards)
    _, paths = sources.locate("fashion_mnist", fashion_idx)
    src = ShardSource(str(fashion_shards))
    for split, n in (("train", 60000), ("test", 10000)):
        truth = sources.load_split(paths, split, 10)
        seen = np.zeros(n, dtype=np.int64)
        for shard in manifest.split(split).shards:
            for x, y, idx in read_blocks(src, shard):
                np.testing.assert_array_equal(x, truth.images[idx])
                np.testing.assert_array_equal(y, truth.labels[idx])
                seen[idx] += 1
        assert (seen == 1).all(), f"every {split} sample exactly once"
        assert manifest.split(split).num_samples == n


def test_manifest_contents_and_schema(fashion_shards):
    raw = json.loads((fashion_shards / "manifest.json").read_text())
    Manifest.model_validate(raw)  # strict: extra keys are rejected
    schema = manifest_json_schema()
    assert set(schema["required"]) >= {"dataset", "image_shape", "dtype", "class_names", "sources", "fingerprint", "splits"}
    assert raw["dataset"] == "fashion_mnist" and raw["image_shape"] == [28, 28] and raw["dtype"] == "uint8"
    assert raw["class_names"][9] == "Ankle boot"
    assert len(raw["splits"]["train"]["shards"]) >= 32, "8 ranks x 4 workers must each get a shard"
    for shard in raw["splits"]["train"]["shards"]:
        assert not Path(shard["url"]).is_absolute() and shard["url"].startswith("train/")
        data = (fashion_shards / shard["url"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert set(raw["sources"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}


def test_packed_records_are_compact(fashion_shards):
    total = sum(p.stat().st_size for p in (fashion_shards / "train").glob("*.tar"))
    assert total < 60000 * 1024, f"{total} bytes: packing must stay far below ~2.5 KiB per sample"


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
        for _ in read_blocks(ShardSource(str(data)), manifest.split("train").shards[2]):
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
