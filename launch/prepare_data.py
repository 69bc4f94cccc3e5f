"""Convert labelled sequences into packed webdataset shards plus manifest.json.

    python launch/prepare_data.py --from data/examples/fsdd/digits.npz --out data/fsdd
    python launch/prepare_data.py --from data/examples/JapaneseVowels --out data/japanese_vowels
    python launch/prepare_data.py --from my.parquet --label-column y --sequence-column x --out data/mine
    python launch/prepare_data.py --dataset fashion_mnist --out data/fashion_mnist
    python launch/prepare_data.py --verify data/fashion_mnist
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_cli
from pipeline.data import prepare_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="output directory for shards and manifest.json")
    mode.add_argument("--verify", metavar="DIR", help="check every shard of a prepared directory")
    own = p.add_argument_group("your own sequences")
    own.add_argument("--from", dest="source_path", metavar="PATH",
                     help="a .npz, a .ts file or a directory of one *_TRAIN.ts/*_TEST.ts pair, a .parquet file or directory")
    own.add_argument("--name", help="the data set's name (default: from the source)")
    own.add_argument("--label-column", help="Parquet: the column of class labels")
    own.add_argument("--sequence-column", help="Parquet: one list<list<float>> column (steps of features)")
    own.add_argument("--channel-columns", help="Parquet: one list<float> column per channel, comma-separated")
    own.add_argument("--group-column", help="Parquet: a group per case (speaker, subject), kept out of two splits")
    own.add_argument("--split-column", help="Parquet: the split of each case (train, val, test)")
    own.add_argument("--missing", choices=["refuse", "interpolate", "zero"], default="refuse",
                     help="missing values (NaN; '?' in .ts): refuse them (default), fill linearly in time, or with 0")
    own.add_argument("--dtype", choices=["float16", "float32"],
                     help="the shards' dtype, narrowed on purpose (default: the source's: uint8, float16 or float32)")
    own.add_argument("--test-size", type=float, default=0.2,
                     help="where the source has no test split: a fraction (default 0.2) or a count, stratified")
    own.add_argument("--split-seed", type=int, default=0, help="seed of the held-out splits")
    images = p.add_argument_group("MNIST and Fashion-MNIST")
    images.add_argument("--dataset", choices=["mnist", "fashion_mnist"], help="an image data set (default without --from: fashion_mnist)")
    images.add_argument("--source", help="directory with the four IDX files (plain or .gz)")
    images.add_argument("--download", action="store_true", help="ignore local copies and fetch from the mirrors (checksums checked)")
    images.add_argument("--download-dir", help="where downloads are cached (default ~/.cache/pipeline/DATASET)")
    images.add_argument("--mirror", action="append", help="download base URL; repeat for fallbacks (env PIPELINE_DATA_MIRRORS)")
    p.add_argument("--val-size", type=float, default=None,
                   help="held out of train, stratified (and grouped): a fraction or a count; 0: none "
                        "(default 0.1; 5000 for the image data sets)")
    p.add_argument("--block-size", type=int, default=256, help="samples packed per tar record")
    p.add_argument("--train-shards", type=int, help="default: by size (44 for the image data sets)")
    p.add_argument("--val-shards", type=int, help="default: by size (4 for the image data sets)")
    p.add_argument("--test-shards", type=int, help="default: by size (8 for the image data sets)")
    p.add_argument("--force", action="store_true", help="rebuild even when a complete dataset is there")
    p.add_argument("--no-hash", action="store_true", help="with --verify: skip sha256 (sizes and counts only)")
    return p.parse_args()


if __name__ == "__main__":
    run_cli(lambda: prepare_cli.main(parse_args()))
