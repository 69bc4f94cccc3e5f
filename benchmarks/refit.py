"""The winner of a finished cross-validated study trained on train + val (the refit launch/tune.py now does)
against the train split alone (what its final runs did before), seed for seed.

    python benchmarks/refit.py --studies runs/tune-archive-v2/studies/ArrowHead runs/tune-archive-v2/studies/OSULeaf \\
        --out benchmarks/results/cpu-refit.json

Each study's winner (study.json) is trained again from its best.yaml on STUDY/folds/refit with the seeds its
final runs used, two runs at a time, one thread each, as the studies ran them; the runs before are read
from STUDY/final/trial-N/seed-S. The study itself is not run again. Test is read once per refit run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from pathlib import Path

from benchmarks.common import ROOT, say, table
from pipeline.config import load_config
from pipeline.tuning.final import train_final
from pipeline.tuning.folds import prepare_refit
from pipeline.tuning.trial_run import TrialCommand


def before(study: Path, winner: int) -> dict[int, float]:
    """Test accuracy of the final runs on the train split alone, by seed."""
    runs = sorted((study / "final" / f"trial-{winner:04d}").glob("seed-*/summary.json"))
    if not runs:
        raise SystemExit(f"error: {study} has no final runs of its winner, trial {winner} (final/trial-{winner:04d})")
    return {int(p.parent.name.removeprefix("seed-")): json.loads(p.read_text())["test_accuracy"] for p in runs}


def refit(study: Path, workers: int) -> dict:
    winner = json.loads((study / "study.json").read_text())["best"]["number"]
    was = before(study, winner)
    data = prepare_refit(load_config(study / "best.yaml").data.dir, study, say)
    commands = [TrialCommand(str(study / "best.yaml"), (), f"refit-{study.name}", ROOT / "launch" / "train.py", threads=1)
                for _ in range(workers)]
    now = train_final(commands, study, winner, sorted(was), threading.Event(), say, data)
    if not now["complete"]:
        raise SystemExit(f"error: a refit run of {study} did not finish; its log is under {study / 'logs'}")
    after = {int(seed): r["test_accuracy"] for seed, r in now["seeds"].items()}
    return {"trial": winner, "train": was, "train_and_val": after,
            "mean": {"train": statistics.fmean(was.values()), "train_and_val": statistics.fmean(after.values())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", nargs="+", required=True, type=Path, help="finished study directories")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    for study in args.studies:
        say(f"{study}: its winner trained on train + val")
        results[study.name] = refit(study, args.workers)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [[name, f"{r['mean']['train']:.3f}", f"{r['mean']['train_and_val']:.3f}",
             ", ".join(f"{r['train'][s]:.3f} / {r['train_and_val'][s]:.3f}" for s in r["train"])]
            for name, r in results.items()]
    print(table("the tuning winner's test accuracy", ["study", "train", "train + val", "by seed"], rows))


if __name__ == "__main__":
    main()
