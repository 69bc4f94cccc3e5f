"""Convert MNIST / Fashion-MNIST IDX files into packed webdataset shards plus manifest.json.

    python launch/prepare_data.py --dataset fashion_mnist --out data/fashion_mnist
    python launch/prepare_data.py --verify data/fashion_mnist
"""

from __future__ import annotations

import argparse

from pipeline.data import prepare_cli
from pipeline.data.shards import ShardOptions
from pipeline.errors import run_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="output directory for shards and manifest.json")
    mode.add_argument("--verify", metavar="DIR", help="check every shard of a prepared directory")
    p.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default="fashion_mnist")
    p.add_argument("--source", help="directory with the four IDX files (plain or .gz)")
    p.add_argument("--download", action="store_true", help="ignore local copies and fetch from the mirrors (checksums checked)")
    p.add_argument("--download-dir", help="where downloads are cached (default ~/.cache/pipeline/DATASET)")
    p.add_argument("--mirror", action="append", help="download base URL; repeat for fallbacks (env PIPELINE_DATA_MIRRORS)")
    d = ShardOptions()
    p.add_argument("--block-size", type=int, default=d.block_size, help="samples packed per tar record")
    p.add_argument("--train-shards", type=int, default=d.train_shards)
    p.add_argument("--test-shards", type=int, default=d.test_shards)
    p.add_argument("--val-size", type=int, default=d.val_size,
                   help="samples held out of train, stratified by class, as the validation split (0: none)")
    p.add_argument("--val-shards", type=int, default=d.val_shards)
    p.add_argument("--force", action="store_true", help="rebuild even when a complete dataset is there")
    p.add_argument("--no-hash", action="store_true", help="with --verify: skip sha256 (sizes and counts only)")
    return p.parse_args()


if __name__ == "__main__":
    run_cli(lambda: prepare_cli.main(parse_args()))
