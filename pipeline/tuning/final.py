"""The winner trained again with each of the final seeds, its test split read once per seed.

Each is an ordinary run of STUDY/best.yaml, as many at once as the study had workers, in
STUDY/final/trial-N/seed-S (N: the winner's trial), or trial-N-refit where it trains on the train and val
cases (folds.prepare_refit). A final run already finished is not run again (its summary holds its one test
score); one interrupted continues from its checkpoint.
"""

from __future__ import annotations

import json
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pipeline.training.outputs import write_json_atomic
from pipeline.tuning.trial_run import Outcome, TrialCommand, watch


def _one(command: TrialCommand, study_dir: Path, winner: int, seed: int, stop: threading.Event,
         refit: Path | None) -> Outcome:
    out = study_dir / "final" / (f"trial-{winner:04d}" + ("-refit" if refit else "")) / f"seed-{seed}"
    summary = out / "summary.json"
    if summary.is_file():
        return Outcome("complete", summary=json.loads(summary.read_text()))
    base = replace(command, config=str(study_dir / "best.yaml"), overrides=())  # the winner's config holds the overrides
    # A refit holds no case out: evaluations during training would read test (eval.split none reads it once)
    params = [f"train.seed={seed}"] + ([f"data.dir={refit}", "eval.split=none"] if refit else [])
    argv = base.argv(out, params, resume=out.is_dir(), name=f"final-seed-{seed}", final=True)
    return watch(argv, base.env(), out, study_dir / "logs" / f"final-seed-{seed}.log", lambda: None,
                 lambda step, accuracy: False, stop)


def train_final(commands: list[TrialCommand], study_dir: Path, winner: int, seeds: list[int], stop: threading.Event,
                say: Callable[[str], None], refit: Path | None = None) -> dict:
    """`winner`: its trial number, which names the final runs' directory (a study continued with more trials
    may choose another, whose runs are its own). `refit`: the data set of train + val to train on instead of
    best.yaml's, whose val figures are then not recorded (they are of cases trained on)."""
    say(f"the winner, trial {winner}, trained with seeds {seeds}, test read once each")
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {seed: pool.submit(_one, commands[i % len(commands)], study_dir, winner, seed, stop, refit)
                   for i, seed in enumerate(seeds)}
        outcomes = {seed: f.result() for seed, f in futures.items()}
    per_seed = {}
    for seed, outcome in outcomes.items():
        if outcome.state != "complete":
            say(f"final seed {seed}: {outcome.error}")
            continue
        s = outcome.summary
        per_seed[seed] = {"test_accuracy": s.get("test_accuracy"),
                          "val_accuracy": None if refit else s.get("final_eval_accuracy"),
                          "steps": s.get("steps"), "wall_s": s.get("wall_s")}
    tests = [r["test_accuracy"] for r in per_seed.values() if r["test_accuracy"] is not None]
    result = {"trial": winner, "trained_on": "train and val" if refit else "train",
              "seeds": per_seed, "test_mean": statistics.fmean(tests) if tests else None,
              "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0 if tests else None,
              "complete": len(per_seed) == len(seeds)}
    write_json_atomic(study_dir / "final.json", result)
    return result
