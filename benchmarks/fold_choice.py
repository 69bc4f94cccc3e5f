"""One default chosen across data sets on k-fold validation, from studies that ran: the trials each study queued
before its sampler drew (the config as given, the space's starting points, a list's candidates) are the same
settings on every set, measured on the same folds, so their validation can be compared set by set.

    python benchmarks/fold_choice.py --studies runs/tune-archive/studies runs/norms \\
        --out benchmarks/results/cpu-fold-choice.json

Each --studies folder holds one study per data set (NAME/trials.csv); a setting is ranked by the mean over
the sets of its validation accuracy (the mean over the folds), and only settings measured on every set that
any setting was measured on are ranked.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from benchmarks.common import say, table


def queued(trials_csv: Path) -> dict[str, float]:
    """Validation accuracy of each complete trial that was not drawn, by its origin without its kind."""
    with open(trials_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["origin"] != "drawn" and r["state"] == "complete"]
    return {r["origin"].removeprefix("start ").removeprefix("candidate "): float(r["val_accuracy"]) for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", nargs="+", required=True, type=Path, help="folders of studies, one per data set")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    by_set: dict[str, dict[str, float]] = {}
    for folder in args.studies:
        for trials in sorted(folder.glob("*/trials.csv")):
            by_set.setdefault(trials.parent.name, {}).update(queued(trials))
    if not by_set:
        raise SystemExit(f"error: no NAME/trials.csv under {', '.join(map(str, args.studies))}")
    settings = sorted(set.intersection(*(set(v) for v in by_set.values())))
    means = {s: statistics.fmean(v[s] for v in by_set.values()) for s in settings}
    rows = [[name, *(f"{v[s]:.3f}" for s in settings)] for name, v in sorted(by_set.items())]
    rows.append(["mean", *(f"{means[s]:.3f}" for s in settings)])
    print(table("validation accuracy over the folds", ["data set", *settings], rows))
    say(f"chosen: {max(means, key=means.get)}")
    if args.out:
        args.out.write_text(json.dumps({"sets": by_set, "mean": means}, indent=2) + "\n")


if __name__ == "__main__":
    main()
