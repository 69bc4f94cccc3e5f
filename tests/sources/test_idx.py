"""IDX parsing, validation and the download path (loopback HTTP server serving the real files)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.sources import idx as sources


def test_real_fashion_files_parse(fashion_idx):
    spec, paths = sources.locate("fashion_mnist", fashion_idx)
    train = sources.load_split(paths, "train", 10)
    test = sources.load_split(paths, "test", 10)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10


def _write_idx(path: Path, magic: int, dims: list[int], body: bytes) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + body)
    return path


@pytest.mark.parametrize(
    "magic,dims,body,kind,needle",
    [
        (0x00000801, [2, 28, 28], bytes(2 * 784), "images", "magic number"),
        (0x00000803, [2, 28, 28], bytes(784), "images", "truncated"),
        (0x00000803, [2, 20, 20], bytes(800), "images", "20x20"),
        (0x00000801, [3], bytes([1, 2, 12]), "labels", "label 12"),
    ],
)
def test_bad_idx_named(tmp_path, magic, dims, body, kind, needle):
    path = _write_idx(tmp_path / "bad-idx", magic, dims, body)
    with pytest.raises(DataError, match=needle) as err:
        sources.parse_idx(path, kind)
    assert str(path) in str(err.value)


def _copy_sources(fashion_idx: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in fashion_idx.glob("*.gz"):
        shutil.copy(p, dest / p.name)
    return dest


def test_truncated_gz_named(tmp_path, fashion_idx):
    src = _copy_sources(fashion_idx, tmp_path / "src")
    target = src / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    spec, paths = sources.locate("fashion_mnist", src)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is a damaged or truncated gzip"):
        sources.load_split(paths, "train", 10)


def test_count_mismatch(tmp_path, fashion_idx):
    src = _copy_sources(fashion_idx, tmp_path / "src")
    # labels of the test split next to train images: a plausible mix-up
    _write_idx(src / "train-labels-idx1-ubyte", 0x00000801, [5], bytes(5))
    (src / "train-labels-idx1-ubyte.gz").unlink()
    spec, paths = sources.locate("fashion_mnist", src)
    with pytest.raises(DataError, match="60000 images but .* 5 labels"):
        sources.load_split(paths, "train", 10)


def test_plain_idx_accepted(tmp_path, fashion_idx):
    src = tmp_path / "plain"
    src.mkdir()
    for p in fashion_idx.glob("t10k*.gz"):
        (src / p.name.removesuffix(".gz")).write_bytes(gzip.decompress(p.read_bytes()))
    images = sources.parse_idx(src / "t10k-images-idx3-ubyte", "images")
    assert images.shape == (10000, 28, 28)


def test_download_through_mirror(tmp_path, mirror):
    root, url = mirror
    cache = tmp_path / "cache"
    spec = sources.get_spec("fashion_mnist")
    sources.download(spec, cache, [url])
    for base in sources.FILES.values():
        assert (cache / f"{base}.gz").read_bytes() == (root / f"{base}.gz").read_bytes()
    assert not list(cache.glob("tmp*")), "temp download dirs must be cleaned up"


def test_download_env_mirror_and_fallback(tmp_path, mirror, monkeypatch):
    _, url = mirror
    # first mirror refuses connections; the second is the real one
    monkeypatch.setenv(sources.MIRRORS_ENV, f"http://127.0.0.1:9/,{url}")
    sources.download(sources.get_spec("fashion_mnist"), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.gz"))) == 4


def test_download_wrong_checksum(tmp_path, mirror):
    root, url = mirror
    data = bytearray((root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(bytes(data))[:-1] + b"\x03"))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="checksum mismatch .*t10k-labels-idx1-ubyte") as err:
        sources.download(sources.get_spec("fashion_mnist"), cache, [url])
    assert url in str(err.value)
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists(), "a file that failed its checksum must not be kept"
