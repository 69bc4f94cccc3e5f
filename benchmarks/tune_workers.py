"""Wall time of one fixed study with 1 worker against 2 workers on this machine's cores, one thread per trial.

    python benchmarks/tune_workers.py --data data/tune-bench/fsdd --trials 8 --reps 2 \\
        --out benchmarks/results/cpu-tune-workers.json

The study is fixed: the same space (learning rate), sampler seed, no pruner and runs of a fixed length, so
both settings train the same number of equal runs; ratio = the 2-worker study's time over the 1-worker
study's (the goal: at most 0.6 on 2 cores). The two settings take turns, repeat by repeat, so that a busy
machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, ROOT, env_for_children, median, say

SPACE = "optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
RUN = ("wandb.mode=disabled", "model.frontend=none", "model.conv_branch=false", "model.readout_dropout=0.0",
       "model.series_norm=false", "model.hidden_size=64", "train.epochs=null",
       "train.min_steps=null", "eval.every_epochs=null", "eval.every_steps=100", "checkpoint.every_steps=1000",
       "train.cpu_threads=1")


def study_seconds(data: Path, work: Path, workers: int, trials: int, steps: int) -> float:
    space = work / "space.yaml"
    space.write_text(SPACE)
    argv = [PY, str(ROOT / "launch" / "tune.py"), "--config", str(ROOT / "configs" / "sequences.yaml"),
            f"data.dir={data}", *RUN, f"train.max_steps={steps}", "--space", str(space), "--trials", str(trials),
            "--workers", str(workers), "--folds", "1", "--pruner", "none", "--final-seeds", "",
            "--dir", str(work / f"study-{workers}")]
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env_for_children(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: the study with {workers} worker(s) failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared data set with a val split of 400 cases or more, e.g. FSDD")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=300, help="training steps of every trial")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.reps):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as work:
                times[workers].append(study_seconds(Path(args.data), Path(work), workers, args.trials, args.steps))
            say(f"repeat {rep}: {workers} worker(s) {times[workers][-1]:.1f} s")
    result = {"trials": args.trials, "steps_per_trial": args.steps, "threads_per_trial": 1,
              "seconds": {str(w): [round(t, 1) for t in ts] for w, ts in times.items()},
              "median_seconds": {str(w): round(median(ts), 1) for w, ts in times.items()},
              "ratio_2_over_1": round(median(times[2]) / median(times[1]), 3)}
    say(f"2 workers / 1 worker: {result['ratio_2_over_1']} (goal: at most 0.6)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
