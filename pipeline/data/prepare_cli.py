"""What `launch/prepare_data.py` does, given its parsed arguments."""

from __future__ import annotations

import argparse
import sys

from pipeline.data.manifest import Manifest
from pipeline.data.prepare import ShardOptions, prepare
from pipeline.data.shards import verify
from pipeline.errors import ConfigError
from pipeline.sources.base import Source


def main(args: argparse.Namespace) -> int:
    if args.verify:
        return _verify(args)
    for flag in ("block_size", "train_shards", "test_shards", "val_shards"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    shards = {split: getattr(args, f"{split}_shards") for split in ("train", "val", "test")}
    options = ShardOptions(args.block_size, {k: v for k, v in shards.items() if v is not None} or None,
                           val_size=args.val_size, test_size=args.test_size, split_seed=args.split_seed,
                           missing=args.missing, dtype=args.dtype)
    source = _source(args)
    for note in source.info.notes:
        print(f"note: {note}")
    result = prepare(source, args.out, options, args.force, args.name, say=lambda line: print(f"note: {line}", flush=True))
    m = result.manifest
    if result.skipped:
        print(f"{args.out} already holds a complete {m.dataset} dataset (fingerprint {m.fingerprint[:12]}); use --force to rebuild")
        return 0
    print(summary(m, args.out, result.seconds))
    return 0


def _source(args: argparse.Namespace) -> Source:
    image_flags = [f for f in ("source", "download_dir", "mirror") if getattr(args, f)] + (["download"] if args.download else [])
    if args.source_path is None:
        from pipeline.sources.idx import open_idx

        return open_idx(args.dataset or "fashion_mnist", args.source, args.download_dir, args.mirror, args.download)
    if args.dataset or image_flags:
        given = ["--dataset"] if args.dataset else []
        given += [f"--{f.replace('_', '-')}" for f in image_flags]
        raise ConfigError(f"--from reads your own data; {', '.join(given)} choose(s) MNIST or Fashion-MNIST instead. "
                          "Give one or the other")
    from pipeline.sources.detect import ColumnOptions, open_source

    channels = args.channel_columns.split(",") if args.channel_columns else None
    columns = ColumnOptions(args.label_column, args.sequence_column, channels, args.group_column, args.split_column)
    return open_source(args.source_path, columns, args.name)


def summary(m: Manifest, out: str, seconds: float) -> str:
    lines = [f"prepared {m.dataset} in {out} in {seconds:.2f} s: {m.features} channel(s) of {m.dtype}, "
             f"{m.num_classes} classes; fingerprint {m.fingerprint[:12]}"]
    for name, split in m.splits.items():
        how = m.splitting.get(name)
        origin = "" if how is None else (" (the source's)" if how.origin == "source" else f" (held out of {how.from_split}, seed {how.seed})")
        lengths = split.lengths
        lines.append(f"  {name:<5} {split.num_samples:>8} cases in {len(split.shards)} shard(s){origin}; lengths "
                     f"{lengths.min}-{lengths.max} (median {lengths.median:g})")
    return "\n".join(lines + _not_made(m))


def _not_made(m: Manifest) -> list[str]:
    """A split asked for that holds no case (too few cases) is said, not just left out of the list."""
    return [f"  {name:<5} none: {how.reason}" for name, how in m.splitting.items() if how.origin == "not_made"]


def _verify(args: argparse.Namespace) -> int:
    problems = verify(args.verify, check_hash=not args.no_hash)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} bad shard(s) in {args.verify}; re-run the preparation with --force", file=sys.stderr)
        return 1
    print(f"verify: all shards of {args.verify} match the manifest")
    return 0
