"""A source -> shards and their manifest: stage the cases, choose the splits, pack the shards, write
the manifest last (its presence means the data set is complete), all in a directory beside --out that
then takes its place in one step (pipeline/data/replace.py).

    stage (one pass over the source, checked case by case) -> splits (pure, by seed)
        -> shard counts, room checked -> shards per split (train shuffled by seed; blocks read back
        from the staging) -> statistics -> manifest.json -> swapped in for --out
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data import splits as splitting
from pipeline.data.interrupt import Interrupted, SignalGuard, Signalled
from pipeline.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    OldManifest,
    SourceEntry,
    SplitEntry,
    fingerprint,
    load_manifest,
    write_manifest,
)
from pipeline.data.prepare_pause import pause
from pipeline.data.replace import Replacement, is_mount
from pipeline.data.shards import write_shard
from pipeline.data.space import FULL, Room, shard_bytes
from pipeline.data.staging import STAGING_DIR, Staging
from pipeline.data.statistics import ChannelMoments, class_counts, length_stats
from pipeline.errors import DataError
from pipeline.files import sha256_file
from pipeline.sources.base import SPLIT_NAMES, Cases, InputError, Source, check_cases

SHARD_BYTES = 32 * 2**20  # a shard's size when the count is chosen for you: big enough to stream well
IMAGE_SHARDS = {"train": 44, "val": 4, "test": 8}  # the image data sets' own counts, which their figures rest on
IMAGE_VAL_SIZE = 5000


@dataclass(frozen=True)
class ShardOptions:
    block_size: int = 256
    shards: dict[str, int] | None = None  # per split; absent: chosen by size (the image data sets: IMAGE_SHARDS)
    shuffle_seed: int = 0
    val_size: float | None = None  # a fraction of train, or a count; None: 0.1 (the image data sets: 5,000); 0: none
    test_size: float = 0.2  # where the source has no test split of its own
    split_seed: int = 0
    missing: str = "refuse"  # NaN / '?': refuse, interpolate or zero (pipeline/sources/base.py)
    dtype: str | None = None  # the shards' dtype when narrowed on purpose (float16); None: the source's


@dataclass
class PrepareResult:
    manifest: Manifest
    seconds: float
    skipped: bool


def prepare(source: Source, out: str | Path, options: ShardOptions = ShardOptions(), force: bool = False,
            name: str | None = None, say: Callable[[str], None] = lambda line: None) -> PrepareResult:
    """Nothing at `out` changes until the new data set is complete: it is built beside `out` and takes its
    place in one step (pipeline/data/replace.py), so bad input, a signal or a full disk at any moment leave
    a data set prepared before as it was. `say`: one line for what killed runs left and this one removed."""
    out, start = Path(out), time.perf_counter()
    dataset = name or source.info.name
    _check_output_dir(out)
    room = Room(out, Path(os.path.realpath(out)).parent)
    with SignalGuard() as guard:
        try:
            with Replacement(out, dataset, say, guard.held) as replacement:
                done = _already_prepared(out, dataset, force)
                if done is not None:
                    return PrepareResult(done, time.perf_counter() - start, skipped=True)
                manifest = _build(source, replacement, dataset, options, room)
        except Signalled as sig:  # told once the build is removed: `out` is as it was
            raise Interrupted(f"interrupted by {sig.name}; {_what_is_kept(out)}", sig.signum) from None
        except OSError as err:
            if err.errno not in FULL:
                raise
            raise room.full(err) from None
    return PrepareResult(manifest, time.perf_counter() - start, skipped=False)


def _what_is_kept(out: Path) -> str:
    if (out / MANIFEST_NAME).is_file():
        return f"{out} is unchanged (the earlier data set is kept)"
    return f"{out} is unchanged" if out.exists() else f"nothing was written to {out}"


def _build(source: Source, replacement: Replacement, dataset: str, options: ShardOptions, room: Room) -> Manifest:
    """The data set in a new directory beside --out, its manifest last, then swapped in for --out."""
    build = replacement.start()
    dtype = np.dtype(options.dtype) if options.dtype else source.info.dtype
    staging = Staging(build, source.info.features, dtype)
    room.staging = staging
    try:
        for cases in source.cases():
            staging.add(fits_dtype(check_cases(cases, source.info.features, options.missing), dtype))
            pause("staging")
        staging.close()
        codes, made = _choose_splits(source, staging, options)
        plan = _plan(source, staging, codes, options)
        blocks = sum(-(-len(rows) // options.block_size) + count for _, rows, count in plan)
        room.shards = shard_bytes(staging.bytes, len(staging.lengths), blocks, sum(count for _, _, count in plan))
        room.check()
        manifest = _write_dataset(source, staging, build, dataset, plan, made, options)
    finally:
        staging.remove()
    write_manifest(manifest, build)
    pause("manifest")
    replacement.swap()
    return manifest


def fits_dtype(cases: Cases, dtype: np.dtype) -> Cases:
    """Values narrowed to float16 must still be finite: float16 ends at 65504."""
    if dtype == np.float16 and cases.values.dtype != np.float16 and len(cases.values):
        big = np.abs(cases.values) > np.finfo(np.float16).max
        if big.any():
            case, _ = cases.case_at(int(np.flatnonzero(big.any(axis=1))[0]))
            raise InputError(f"{cases.case(case)} holds a value beyond float16's range (65504); prepare without "
                             "--dtype float16, or scale the values first")
    return cases


def _already_prepared(out: Path, dataset: str, force: bool) -> Manifest | None:
    """The manifest of a complete data set of this name at `out`, unless forced or of an older format."""
    if force or not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = load_manifest(out)
    except OldManifest:
        return None  # written by an older version: prepared again
    if manifest.dataset != dataset:
        raise DataError(f"--out {out} already holds {manifest.dataset}; choose another directory for {dataset}")
    return manifest


def _choose_splits(source: Source, staging: Staging, options: ShardOptions):
    image = source.info.image_shape is not None
    val_size = options.val_size if options.val_size is not None else (IMAGE_VAL_SIZE if image else 0.1)
    if len(staging.lengths) < 2:
        raise InputError(f"{source.info.files[0]} holds {len(staging.lengths)} case(s); there is nothing to split "
                         "and train on")
    given = splitting.source_splits(staging.split, str(source.info.files[0])) if staging.split is not None else None
    return splitting.assign(staging.labels, staging.groups, given, options.test_size, val_size, options.split_seed,
                            source.info)


def _plan(source: Source, staging: Staging, codes: np.ndarray, options: ShardOptions) -> list[tuple[str, np.ndarray, int]]:
    """Each split's cases in shard order and its shard count, before anything is written: a count that
    cannot be cut is refused, and the shards' size can be estimated."""
    plan = []
    for code, split in enumerate(SPLIT_NAMES):
        rows = np.flatnonzero(codes == code)
        if len(rows) == 0:
            continue
        if split == "train":
            # Spread classes and source order evenly over shards, so any shard subset is a fair sample.
            rows = rows[np.random.default_rng(options.shuffle_seed).permutation(len(rows))]
        plan.append((split, rows, _shard_count(split, rows, staging, source.info.image_shape is not None, options)))
    return plan


def _write_dataset(source: Source, staging: Staging, out: Path, dataset: str, plan: list[tuple[str, np.ndarray, int]],
                   made: dict, options: ShardOptions) -> Manifest:
    info = source.info
    moments = ChannelMoments(info.features)
    entries = {}
    for split, rows, count in plan:
        entries[split] = _write_split(out, split, rows, count, staging, options.block_size,
                                      moments if split == "train" else None, info.class_names)
    manifest = Manifest(
        dataset=dataset, features=info.features, dtype=str(staging.dtype), label_dtype="int64",
        num_classes=len(info.class_names), class_names=info.class_names,
        image_shape=list(info.image_shape) if info.image_shape else None, block_size=options.block_size,
        shuffle_seed=options.shuffle_seed, splitting=made, normalization=moments.result(),
        sources={p.name: SourceEntry(sha256=sha256_file(p), bytes=p.stat().st_size) for p in info.files},
        fingerprint="0" * 64, splits=entries,
    )
    return manifest.model_copy(update={"fingerprint": fingerprint(manifest)})


def _shard_count(split: str, rows: np.ndarray, staging: Staging, image: bool, options: ShardOptions) -> int:
    if options.shards and split in options.shards:
        count = options.shards[split]
    elif image:
        count = IMAGE_SHARDS[split]
    else:
        size = int(staging.lengths[rows].sum()) * staging.features * staging.dtype.itemsize
        count = max(-(-size // SHARD_BYTES), min(8, -(-len(rows) // options.block_size)))
    if count > len(rows):
        raise DataError(f"cannot cut {len(rows)} {split} samples into {count} shards; ask for at most {len(rows)}")
    return count


def _write_split(out: Path, split: str, rows: np.ndarray, count: int, staging: Staging, block_size: int,
                 moments: ChannelMoments | None, class_names: list[str]) -> SplitEntry:
    (out / split).mkdir(parents=True, exist_ok=True)
    bounds = [i * len(rows) // count for i in range(count + 1)]
    shards = []
    for s in range(count):
        part = rows[bounds[s]:bounds[s + 1]]
        blocks = (staging.block(part[b:b + block_size]) for b in range(0, len(part), block_size))
        if moments is not None:
            blocks = _counted(blocks, moments)
        shards.append(write_shard(out / split / f"{split}-{s:05d}.tar", f"{split}-{s:05d}", blocks))
        if s == 0:
            pause("shards")
    return SplitEntry(num_samples=len(rows), class_counts=class_counts(staging.labels[rows], class_names),
                      lengths=length_stats(staging.lengths[rows]), shards=shards)


def _counted(blocks, moments: ChannelMoments):
    for block in blocks:
        moments.add(block.values)
        yield block


def _is_ours(out: Path, path: Path) -> bool:
    rel = path.relative_to(out)
    if rel.name in (MANIFEST_NAME, f".{MANIFEST_NAME}.tmp"):
        return len(rel.parts) == 1
    if rel.parts[0] == STAGING_DIR or (rel.parts[0].startswith(".prepare") and is_mount(Path(os.path.realpath(out)))):
        return True  # what a preparation builds, or leaves when killed; inside --out only where it is a mount
    if rel.parts[0] in SPLIT_NAMES:
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
