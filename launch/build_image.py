"""Build the training image with docker or podman, tagged from git; prints its name.

    python launch/build_image.py                 # CUDA base; the CPU stand-in where it cannot be pulled
    python launch/build_image.py --base cpu      # the CPU stand-in base (Dockerfile.cpu-base)
    python launch/build_image.py --base IMAGE    # any base with python, pip and torch
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="auto", help="auto (default), cuda, cpu, or an image")
    p.add_argument("--tag", help="image name (default: localhost/lstm-pipeline:<commit>[-dirty][-cpu])")
    p.add_argument("--engine", choices=["docker", "podman"], help="default: docker if its daemon answers, else podman")
    p.add_argument("--quiet", action="store_true", help="only the image name on stdout")
    args = p.parse_args()
    from pipeline.kube.image import build_image

    print(build_image(args.base, args.tag, args.engine, quiet=args.quiet))
    return 0


if __name__ == "__main__":
    run_cli(main)
