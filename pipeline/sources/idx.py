"""The MNIST family (IDX files) as a source: locate local files, download with checksums, parse and validate.

An image is a sequence of 28 steps (rows) of 28 uint8 features (pixels), as the model reads it.

IDX format (http://yann.lecun.com/exdb/mnist/): big-endian magic 0x00000803 (uint8, 3 dims)
for images and 0x00000801 (uint8, 1 dim) for labels, then the dimension sizes, then the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.base import Cases, SourceInfo

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]

FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IMAGE_SHAPE = (28, 28)
MIRRORS_ENV = "PIPELINE_DATA_MIRRORS"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: list[str]
    torchvision_class: str
    # SHA-256 of the decompressed IDX bytes: survives re-compression (Debian re-gzips the files).
    content_sha256: dict[str, str] = field(default_factory=dict)
    local_dirs: list[str] = field(default_factory=list)

    def published(self) -> tuple[list[str], dict[str, str]]:
        """Mirrors and .gz md5s as torchvision knows them (imported lazily: it costs seconds)."""
        from torchvision import datasets

        cls = getattr(datasets, self.torchvision_class)
        return list(cls.mirrors), {name.removesuffix(".gz"): digest for name, digest in cls.resources}


def get_spec(name: str) -> DatasetSpec:
    if name == "mnist":
        return DatasetSpec("mnist", MNIST_CLASSES, "MNIST")
    if name == "fashion_mnist":
        return DatasetSpec(
            "fashion_mnist",
            FASHION_CLASSES,
            "FashionMNIST",
            content_sha256={
                "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
            local_dirs=["/usr/share/datasets/fashion-mnist"],
        )
    raise DataError(f"unknown dataset '{name}'; choose mnist or fashion_mnist")


@dataclass
class Split:
    images: np.ndarray  # uint8 [n, 28, 28]
    labels: np.ndarray  # int64 [n]


def _find_file(directory: Path, base: str) -> Path | None:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(
            f"{path} is a damaged or truncated gzip file ({err}); delete it and download or copy it again"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None


def parse_idx(path: Path, kind: str, num_classes: int = 10) -> np.ndarray:
    """Parse one IDX file; `kind` is 'images' or 'labels'. Raises DataError naming the file."""
    data = _read_bytes(path)
    want_magic, ndim = (0x00000803, 3) if kind == "images" else (0x00000801, 1)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is too short to be an IDX {kind} file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != want_magic:
        raise DataError(
            f"{path} has IDX magic number 0x{magic:08x}, expected 0x{want_magic:08x} for {kind}; "
            "is it the right file?"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images; this pipeline expects 28x28")
    expected = int(np.prod(dims))
    body = len(data) - header
    if body != expected:
        raise DataError(
            f"{path} is truncated or padded: header says {dims} ({expected} bytes of data), "
            f"file holds {body}; delete it and fetch it again"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if kind == "labels":
        bad = array >= num_classes
        if bad.any():
            raise DataError(f"{path} has label {int(array[bad][0])} outside 0..{num_classes - 1}")
        return array.astype(np.int64)
    return array


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    h.update(path.read_bytes())
    return h.hexdigest()


def check_checksum(spec: DatasetSpec, gz_md5: dict[str, str], base: str, path: Path) -> None:
    """Accept a file whose .gz md5 or decompressed sha256 matches the published value."""
    if path.suffix == ".gz" and _md5_file(path) == gz_md5.get(base):
        return
    content = spec.content_sha256.get(base)
    if content is not None and hashlib.sha256(_read_bytes(path)).hexdigest() == content:
        return
    raise DataError(
        f"checksum mismatch for {path}: it is not the published {spec.name} file {base}; "
        "the mirror served something else or the download was damaged. Delete it and retry, or use another mirror"
    )


def download(spec: DatasetSpec, dest: Path, mirrors: list[str] | None = None) -> None:
    """Download the four .gz files into dest, each checked before it is moved into place.

    Mirrors: the argument, else $PIPELINE_DATA_MIRRORS (comma-separated), else torchvision's list.
    """
    from torchvision.datasets.utils import download_url

    published_mirrors, gz_md5 = spec.published()
    env = [m for m in os.environ.get(MIRRORS_ENV, "").split(",") if m]
    mirrors = mirrors or env or published_mirrors
    dest.mkdir(parents=True, exist_ok=True)
    for base in FILES.values():
        target = dest / f"{base}.gz"
        if target.is_file():
            check_checksum(spec, gz_md5, base, target)
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{base}.gz"
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                try:
                    download_url(url, tmp, filename=target.name)
                except Exception as err:  # network errors come in many types; report them all
                    errors.append(f"{url}: {err}")
                    continue
                fetched = Path(tmp) / target.name
                try:
                    check_checksum(spec, gz_md5, base, fetched)
                except DataError as err:
                    errors.append(f"{url}: {err}")
                    continue
                os.replace(fetched, target)
                break
        else:
            raise DataError(
                f"could not download {base}.gz for {spec.name}: " + "; ".join(errors)
                + f". Set {MIRRORS_ENV} or --mirror to a reachable mirror, or pass --source DIR with the IDX files"
            )


def locate(
    name: str,
    source: str | Path | None = None,
    download_dir: str | Path | None = None,
    mirrors: list[str] | None = None,
    force_download: bool = False,
) -> tuple[DatasetSpec, dict[tuple[str, str], Path]]:
    """Find the four IDX files: --source, then the system dirs, then a (cached) download."""
    spec = get_spec(name)
    if source is not None:
        candidates = [Path(source)]
    else:
        candidates = [] if force_download else [Path(d) for d in spec.local_dirs]
    for directory in candidates:
        found = {key: _find_file(directory, base) for key, base in FILES.items()}
        if all(found.values()):
            return spec, found  # type: ignore[return-value]
        if source is not None:
            missing = [FILES[k] for k, v in found.items() if v is None]
            raise DataError(
                f"--source {directory} lacks {', '.join(missing)} (plain or .gz); "
                f"it needs the four {spec.name} IDX files"
            )
    cache = Path(download_dir) if download_dir else Path.home() / ".cache" / "pipeline" / name
    download(spec, cache, mirrors)
    return spec, {key: cache / f"{base}.gz" for key, base in FILES.items()}


def load_split(paths: dict[tuple[str, str], Path], split: str, num_classes: int) -> Split:
    images = parse_idx(paths[(split, "images")], "images")
    labels = parse_idx(paths[(split, "labels")], "labels", num_classes)
    if len(images) != len(labels):
        raise DataError(
            f"{paths[(split, 'images')]} holds {len(images)} images but "
            f"{paths[(split, 'labels')]} holds {len(labels)} labels; they must come from the same release"
        )
    return Split(images, labels)


class IdxSource:
    """The train and test files of an MNIST-family data set; the source's own splits are theirs."""

    def __init__(self, spec: DatasetSpec, paths: dict[tuple[str, str], Path]):
        self.spec, self.paths = spec, paths
        files = sorted(paths.values(), key=lambda p: p.name)
        self.info = SourceInfo(spec.name, files, spec.class_names, IMAGE_SHAPE[1], np.dtype(np.uint8),
                               image_shape=IMAGE_SHAPE, has_splits=True)

    def cases(self) -> Iterator[Cases]:
        for split in ("train", "test"):
            data = load_split(self.paths, split, len(self.spec.class_names))
            n = len(data.labels)
            yield Cases(data.images.reshape(n * IMAGE_SHAPE[0], IMAGE_SHAPE[1]), np.full(n, IMAGE_SHAPE[0], np.int64),
                        data.labels, str(self.paths[(split, "images")]), np.arange(n, dtype=np.int64), "image",
                        split=np.full(n, split))


def open_idx(name: str, source: str | Path | None = None, download_dir: str | Path | None = None,
             mirrors: list[str] | None = None, force_download: bool = False) -> IdxSource:
    return IdxSource(*locate(name, source, download_dir, mirrors, force_download))
