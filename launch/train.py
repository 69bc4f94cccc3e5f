"""Train the sequence classifier.

    accelerate launch launch/train.py --config configs/fashion_mnist.yaml [key.sub=value ...] [--resume auto | --overwrite]
    python launch/train.py --config configs/cpu_test.yaml        # one process
    torchrun --nproc_per_node 2 launch/train.py --config ...      # also works
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/cpu_test.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys, e.g. train.max_steps=100")
    p.add_argument("--resume", metavar="auto|PATH", help="auto: newest complete checkpoint in output_dir (fresh start if none); or a checkpoint dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir: its checkpoints, metrics, summary, model and plots are "
                        "removed first (never files the pipeline did not write); without it a run there is refused")
    return p.parse_args()


def main(env) -> int:
    args = parse_args()
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config is reported before torch is even imported
    from pipeline.distributed.cpu_threads import configure

    configure(env, cfg.train.cpu_threads)  # OpenMP reads its variables when torch loads: before that
    from pipeline.training.run import train

    train(cfg, resume=args.resume, env=env, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    from pipeline.distributed.launch_env import LaunchEnv

    run_cli(main, LaunchEnv.from_environ)  # the one read of the launcher's variables
