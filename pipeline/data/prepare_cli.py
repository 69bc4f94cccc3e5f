"""What `launch/prepare_data.py` does, given its parsed arguments."""

from __future__ import annotations

import argparse
import sys

from pipeline.data.shards import ShardOptions, prepare, verify
from pipeline.errors import UserError


def main(args: argparse.Namespace) -> int:
    if args.verify:
        problems = verify(args.verify, check_hash=not args.no_hash)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(f"verify: {len(problems)} bad shard(s) in {args.verify}; re-run the preparation with --force", file=sys.stderr)
            return 1
        print(f"verify: all shards of {args.verify} match the manifest")
        return 0
    for name in ("block_size", "train_shards", "test_shards", "val_shards"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    options = ShardOptions(args.block_size, args.train_shards, args.test_shards, val_size=args.val_size,
                           val_shards=args.val_shards)
    result = prepare(args.dataset, args.out, args.source, options, args.force, args.download_dir, args.mirror, args.download)
    m = result.manifest
    if result.skipped:
        print(f"{args.out} already holds a complete {m.dataset} dataset (fingerprint {m.fingerprint[:12]}); use --force to rebuild")
        return 0
    counts = ", ".join(f"{name} {s.num_samples} samples in {len(s.shards)} shards" for name, s in m.splits.items())
    print(f"prepared {m.dataset} in {args.out}: {counts}; {result.seconds:.2f} s; fingerprint {m.fingerprint[:12]}")
    return 0
