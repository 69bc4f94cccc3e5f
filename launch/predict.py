"""Predict the class of your own images with a trained model: one JSON line per image, with the
predicted class name and every class's probability.

    python launch/predict.py --model runs/fashion_mnist/model shirt.png boot.jpg
    python launch/predict.py --model runs/fashion_mnist/model images.npy      # [n, 28, 28] uint8
"""

from __future__ import annotations

import argparse

from pipeline.errors import run_cli
from pipeline.inference.images import CONVERSION


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__ + "\n" + CONVERSION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run's model directory (RUN/model) or a checkpoint (RUN/checkpoints/step-N)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files, or .npy arrays of images")
    p.add_argument("--invert", action="store_true", help="invert grey levels first (dark object on a light background)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from pipeline.inference.predict import run

    run(args.model, args.images, invert=args.invert)
    return 0


if __name__ == "__main__":
    from pipeline.distributed.launch_env import LaunchEnv

    run_cli(lambda env: main(), LaunchEnv.from_environ)  # under accelerate launch: one rank of several
