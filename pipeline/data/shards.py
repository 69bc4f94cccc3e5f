"""Write packed webdataset shards and their manifest; verify them.

Each tar record packs `block_size` samples: `x.npy` (uint8 [n, 28, 28]), `y.npy` (int64 [n])
and `idx.npy` (int64 [n], the sample's index in the source IDX file). Tar pads every member to
512 bytes plus a 512-byte header, so one member per sample costs ~2.5 KiB for a 784-byte image
and decodes ~200x slower (webdataset/webdataset#115); a block costs one header per array.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import sources
from pipeline.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    SourceEntry,
    SplitEntry,
    Validation,
    fingerprint,
    load_manifest,
    write_manifest,
)
from pipeline.errors import DataError
from pipeline.files import mask_url

SPLITS = ("train", "val", "test")
TAR_MTIME = 0  # fixed so the same input gives byte-identical shards


@dataclass(frozen=True)
class ShardOptions:
    block_size: int = 256
    train_shards: int = 44
    test_shards: int = 8
    shuffle_seed: int = 0
    val_size: int = 5000  # held out of train for choosing recipes; 0: no validation split
    val_shards: int = 4
    val_seed: int = 0


def hold_out(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a validation set of `size` samples, stratified by class: each class gives its
    share of `size` (largest remainders settle the rounding), chosen by a generator of `seed`."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, key_prefix: str, images: np.ndarray, labels: np.ndarray, index: np.ndarray, block_size: int) -> ShardEntry:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for b, start in enumerate(range(0, len(images), block_size)):
            sl = slice(start, start + block_size)
            key = f"{key_prefix}-{b:04d}"
            _add_member(tar, f"{key}.x.npy", _npy_bytes(images[sl]))
            _add_member(tar, f"{key}.y.npy", _npy_bytes(labels[sl].astype(np.int64)))
            _add_member(tar, f"{key}.idx.npy", _npy_bytes(index[sl].astype(np.int64)))
    tmp.replace(path)
    data = path.read_bytes()
    return ShardEntry(
        url=f"{path.parent.name}/{path.name}",
        num_samples=len(images),
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
    )


def write_split(out: Path, name: str, split: sources.Split, num_shards: int, options: ShardOptions,
                members: np.ndarray | None = None) -> SplitEntry:
    """The split's shards; `members`: which samples of the source file it takes (the rest of train
    goes to the validation split), recorded as their ids."""
    members = np.arange(len(split.labels), dtype=np.int64) if members is None else members
    n = len(members)
    if num_shards > n:
        raise DataError(f"cannot cut {n} {name} samples into {num_shards} shards")
    index = members
    if name == "train":
        # Spread classes and source order evenly over shards, so any shard subset is a fair sample.
        index = members[np.random.default_rng(options.shuffle_seed).permutation(n)]
    images, labels = split.images[index], split.labels[index]
    split_dir = out / name
    split_dir.mkdir(parents=True, exist_ok=True)
    bounds = [i * n // num_shards for i in range(num_shards + 1)]
    shards = []
    for s in range(num_shards):
        lo, hi = bounds[s], bounds[s + 1]
        shards.append(
            write_shard(split_dir / f"{name}-{s:05d}.tar", f"{name}-{s:05d}", images[lo:hi], labels[lo:hi], index[lo:hi], options.block_size)
        )
    return SplitEntry(num_samples=n, shards=shards)


def _is_ours(out: Path, path: Path) -> bool:
    rel = path.relative_to(out)
    if rel.name in (MANIFEST_NAME, f".{MANIFEST_NAME}.tmp"):
        return len(rel.parts) == 1
    if rel.parts[0] in SPLITS:
        return len(rel.parts) == 1 or (len(rel.parts) == 2 and (rel.name.endswith(".tar") or rel.name.endswith(".tar.tmp")))
    return False


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if not out.exists():
        return
    foreign = [p for p in out.rglob("*") if not _is_ours(out, p)]
    if foreign:
        listed = ", ".join(str(p.relative_to(out)) for p in foreign[:3])
        raise DataError(
            f"--out {out} holds files that are not shards of this pipeline ({listed}{', ...' if len(foreign) > 3 else ''}); "
            "choose an empty or new directory, so nothing of yours is overwritten or deleted"
        )


@dataclass
class PrepareResult:
    manifest: Manifest
    seconds: float
    skipped: bool


def prepare(
    dataset: str,
    out: str | Path,
    source: str | Path | None = None,
    options: ShardOptions = ShardOptions(),
    force: bool = False,
    download_dir: str | Path | None = None,
    mirrors: list[str] | None = None,
    force_download: bool = False,
) -> PrepareResult:
    out = Path(out)
    start = time.perf_counter()
    _check_output_dir(out)
    if (out / MANIFEST_NAME).is_file() and not force:
        manifest = load_manifest(out)
        if manifest.dataset != dataset:
            raise DataError(f"--out {out} already holds {manifest.dataset}; choose another directory for {dataset}")
        return PrepareResult(manifest, time.perf_counter() - start, skipped=True)
    # Either a forced rebuild or an interrupted one (no manifest): start clean.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    spec, paths = sources.locate(dataset, source, download_dir, mirrors, force_download)
    num_classes = len(spec.class_names)
    train = sources.load_split(paths, "train", num_classes)
    if not 0 <= options.val_size < len(train.labels):
        raise DataError(f"--val-size {options.val_size} must be between 0 and the train split's {len(train.labels)}")
    held = hold_out(train.labels, options.val_size, options.val_seed) if options.val_size else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(train.labels)), held)
    splits = {"train": write_split(out, "train", train, options.train_shards, options, kept)}
    if options.val_size:
        splits["val"] = write_split(out, "val", train, options.val_shards, options, held)
    splits["test"] = write_split(out, "test", sources.load_split(paths, "test", num_classes), options.test_shards, options)
    manifest = Manifest(
        dataset=dataset,
        image_shape=list(sources.IMAGE_SHAPE),
        dtype="uint8",
        label_dtype="int64",
        num_classes=num_classes,
        class_names=spec.class_names,
        block_size=options.block_size,
        shuffle_seed=options.shuffle_seed,
        validation=Validation(from_split="train", num_samples=options.val_size, seed=options.val_seed,
                              stratified_by="label") if options.val_size else None,
        sources={name: SourceEntry(**info) for name, info in sources.describe_sources(paths).items()},
        fingerprint=fingerprint(dataset, splits),
        splits=splits,
    )
    write_manifest(manifest, out)
    return PrepareResult(manifest, time.perf_counter() - start, skipped=False)


def iter_tar_blocks(fileobj, name: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (key, x, y, idx) per record of an open tar stream; raise DataError naming `name`."""
    import webdataset as wds

    try:
        for sample in wds.tariterators.group_by_keys(_with_url(wds.tariterators.tar_file_iterator(fileobj), name)):
            yield sample["__key__"], *_decode_record(sample, name)
    except DataError:
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise DataError(mask_url(f"shard {name} is corrupt or truncated ({err}); re-run the preparation with --force")) from None


def _with_url(files, name: str):
    # group_by_keys wants the shard URL on every member, as tar_file_expander would set it.
    for f in files:
        f["__url__"] = name
        yield f


def _decode_record(sample: dict, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        x = np.load(io.BytesIO(sample["x.npy"]), allow_pickle=False)
        y = np.load(io.BytesIO(sample["y.npy"]), allow_pickle=False)
        idx = np.load(io.BytesIO(sample["idx.npy"]), allow_pickle=False)
    except KeyError as err:
        raise DataError(f"shard {name}: record {sample.get('__key__')} lacks member {err}") from None
    if not (x.ndim == 3 and x.dtype == np.uint8 and len(x) == len(y) == len(idx)):
        raise DataError(f"shard {name}: record {sample.get('__key__')} has inconsistent arrays {x.shape}/{y.shape}/{idx.shape}")
    return x, y, idx


def verify(directory: str | Path, check_hash: bool = True) -> list[str]:
    """Return one problem line per bad shard (empty when all hold)."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems = []
    for split in manifest.splits.values():
        for shard in split.shards:
            path = directory / shard.url
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != shard.bytes:
                problems.append(f"{path}: size {size} bytes, manifest says {shard.bytes}")
                continue
            data = path.read_bytes()
            if check_hash and hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(f"{path}: sha256 differs from the manifest (the file was modified or damaged)")
                continue
            try:
                count = sum(len(y) for _, _, y, _ in iter_tar_blocks(io.BytesIO(data), str(path)))
            except DataError as err:
                problems.append(f"{path}: unreadable ({err})")
                continue
            if count != shard.num_samples:
                problems.append(f"{path}: holds {count} samples, manifest says {shard.num_samples}")
    return problems
