"""Predict the class of your own images or sequences with a trained model: one JSON line per image or
sequence, with the predicted class name and every class's probability.

    python launch/predict.py --model runs/fashion_mnist/model shirt.png boot.jpg
    python launch/predict.py --model runs/fashion_mnist/model images.npy      # [n, 28, 28] uint8
    python launch/predict.py --model runs/sequences/model recordings.npz     # X + lengths, y optional
    python launch/predict.py --model runs/sequences/model cases.ts
    python launch/predict.py --model runs/sequences/model cases.parquet --sequence-column x [--label-column y]
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_cli
from pipeline.inference.images import CONVERSION


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__ + "\n" + CONVERSION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run's model directory (RUN/model) or a checkpoint (RUN/checkpoints/step-N)")
    p.add_argument("images", nargs="+", metavar="FILE",
                   help="an image model: PNG or JPEG files, or .npy arrays of images; a sequence model: .npz, .ts or "
                        ".parquet files of sequences (labels optional, reported as 'label' where given)")
    p.add_argument("--invert", action="store_true", help="images: invert grey levels first (dark object on a light background)")
    p.add_argument("--label-column", help="Parquet: the labels, if the file has them")
    p.add_argument("--sequence-column", help="Parquet: one list<list<float>> column (steps of features)")
    p.add_argument("--channel-columns", help="Parquet: one list<float> column per channel, comma-separated")
    p.add_argument("--missing", choices=["refuse", "interpolate", "zero"], default="refuse",
                   help="sequences: missing values (NaN; '?' in .ts) refused, or filled as prepare_data.py fills them")
    return p.parse_args()


def main(env) -> int:
    args = parse_args()
    from pipeline.distributed.cpu_threads import configure

    # Before torch loads (OpenMP reads its variables then); unsaid: stdout is the JSON lines, stderr the errors.
    configure(env, say=lambda line: None)
    from pipeline.inference.predict import run
    from pipeline.sources.detect import ColumnOptions

    channels = args.channel_columns.split(",") if args.channel_columns else None
    run(args.model, args.images, invert=args.invert, missing=args.missing,
        columns=ColumnOptions(args.label_column, args.sequence_column, channels))
    return 0


if __name__ == "__main__":
    from pipeline.distributed.launch_env import LaunchEnv

    run_cli(main, LaunchEnv.from_environ)  # under accelerate launch: one rank of several
