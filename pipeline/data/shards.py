"""The shard format: packed webdataset tar records of ragged sequences; writing, reading, verifying.

Each tar record packs up to `block_size` cases: `x.npy` (their steps concatenated, [sum of lengths,
features], in the data set's dtype), `len.npy` (int32 [n], each case's steps), `y.npy` (int64 [n],
class indices) and `idx.npy` (int64 [n], each case's index in its source file). Tar pads every
member to 512 bytes plus a 512-byte header, so one member per sample costs ~2.5 KiB for a 784-byte
image and decodes ~200x slower (webdataset/webdataset#115); a block costs one header per array.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.data.manifest import ShardEntry, load_manifest
from pipeline.errors import DataError
from pipeline.files import mask_url

TAR_MTIME = 0  # fixed so the same input gives byte-identical shards
MEMBERS = ("x.npy", "len.npy", "y.npy", "idx.npy")


@dataclass
class Block:
    """One record: a run of cases, ragged."""

    values: np.ndarray  # [sum(lengths), features]
    lengths: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.lengths)


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


def write_shard(path: Path, key_prefix: str, blocks: Iterable[Block]) -> ShardEntry:
    """One shard of these blocks, written through a temporary name; its manifest entry."""
    tmp = path.with_suffix(".tar.tmp")
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for b, block in enumerate(blocks):
            key = f"{key_prefix}-{b:04d}"
            arrays = (block.values, block.lengths.astype(np.int32), block.labels.astype(np.int64), block.ids.astype(np.int64))
            for member, array in zip(MEMBERS, arrays, strict=True):
                _add_member(tar, f"{key}.{member}", _npy_bytes(array))
            count += len(block)
    tmp.replace(path)
    data = path.read_bytes()
    return ShardEntry(url=f"{path.parent.name}/{path.name}", num_samples=count,
                      sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def iter_tar_blocks(fileobj, name: str) -> Iterator[tuple[str, Block]]:
    """Yield (key, block) per record of an open tar stream; raise DataError naming `name`."""
    import webdataset as wds

    try:
        for sample in wds.tariterators.group_by_keys(_with_url(wds.tariterators.tar_file_iterator(fileobj), name)):
            yield sample["__key__"], _decode_record(sample, name)
    except DataError:
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise DataError(mask_url(f"shard {name} is corrupt or truncated ({err}); re-run the preparation with --force")) from None


def _with_url(files, name: str):
    # group_by_keys wants the shard URL on every member, as tar_file_expander would set it.
    for f in files:
        f["__url__"] = name
        yield f


def _decode_record(sample: dict, name: str) -> Block:
    try:
        x, lengths, y, idx = (np.load(io.BytesIO(sample[m]), allow_pickle=False) for m in MEMBERS)
    except KeyError as err:
        raise DataError(f"shard {name}: record {sample.get('__key__')} lacks member {err}; it was written by another "
                        "version of this pipeline or damaged: prepare the data again with --force") from None
    n = len(lengths)
    if not (x.ndim == 2 and lengths.ndim == 1 and len(y) == len(idx) == n and int(lengths.sum()) == len(x)):
        raise DataError(f"shard {name}: record {sample.get('__key__')} has inconsistent arrays "
                        f"{x.shape}/{lengths.shape}/{y.shape}/{idx.shape}")
    return Block(x, lengths.astype(np.int64), y, idx)


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
                count = sum(len(block) for _, block in iter_tar_blocks(io.BytesIO(data), str(path)))
            except DataError as err:
                problems.append(f"{path}: unreadable ({err})")
                continue
            if count != shard.num_samples:
                problems.append(f"{path}: holds {count} samples, manifest says {shard.num_samples}")
    return problems
