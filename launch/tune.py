"""Tune a config on the validation split: an Optuna study whose trials are ordinary training runs.

    python launch/tune.py --config configs/sequences.yaml data.dir=data/examples/ArrowHead \\
        --space configs/search/sequences.yaml --trials 40 --workers 2 --timeout 1800

The study lives in --dir (default runs/tune/STUDY): its journal, one run directory per trial, the logs,
trials.csv, the plots, best.yaml (a config train.py runs as is) and final.json (the winner trained with
--final-seeds, test read once per seed). Started again with the same --study and storage, a study
interrupted (Ctrl-C, SIGTERM, a lost worker) goes on where it stopped.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.cli import run_cli
from pipeline.tuning import STORAGE_VAR


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the config every trial starts from, e.g. configs/sequences.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every trial, e.g. data.dir=DIR")
    p.add_argument("--space", required=True, help="the search space, e.g. configs/search/sequences.yaml, or a list of "
                   "candidates to compare, e.g. benchmarks/recipes/conv_models.yaml")
    p.add_argument("--trials", type=int, help="trials in the study, all workers together (interrupted ones not "
                   "counted: they continue); default with a list of candidates: each of them")
    p.add_argument("--workers", type=int, default=1, help="trials at once on this machine, sharing its cores (threads "
                   "per trial = usable CPUs / workers) or taking one GPU each")
    p.add_argument("--processes", type=int, default=1, help="processes of each trial's run (accelerate launch, DDP: "
                   "gloo on the CPU, one GPU each where present); with train.global_batch_size set, a run's batches are the same at any count")
    p.add_argument("--study", help="the study's name (default: the config's and data set's names)")
    p.add_argument("--dir", help="the study directory (default runs/tune/STUDY)")
    p.add_argument("--storage", default=os.environ.get(STORAGE_VAR) or None,
                   help="a database URL shared by workers on several machines (postgresql://user:pw@host/db); default: "
                   f"${STORAGE_VAR} where set (a password then stays out of the command line), else a journal file in "
                   "the study directory")
    p.add_argument("--timeout", type=float, help="a time box in seconds: then the running trials stop too (each "
                   "checkpoints and is queued to continue) and the report is written")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="how hopeless trials are stopped at the rank-zero evaluations")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--folds", type=int, help="k-fold cross-validation over the train and val cases, each trial one "
                   "run per fold; 1: the data set's own val split. Default: 3 where val holds fewer than 400 cases, else 1")
    p.add_argument("--final-seeds", default="0,1,2", help="train the winner with these seeds and read test once each; "
                   "'' for none (a worker of a study that another finishes)")
    p.add_argument("--no-refit", action="store_true", help="train the winner's final runs on the train split alone; "
                   "by default, where the trials cross-validated, they train on the train and val cases the folds held")
    p.add_argument("--index", type=int, default=0, help="this tuner's number among tuners started together (a "
                   "Kubernetes pod's index): only tuner 0 trains the winner with --final-seeds")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from pipeline.tuning.tune import TuneRequest, tune

    return tune(TuneRequest.from_args(args, Path(__file__).resolve().with_name("train.py")))


if __name__ == "__main__":
    run_cli(main)
