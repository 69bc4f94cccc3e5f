"""The table of docs/sequences.md "Convolutional models": per data set, the validation and test accuracy
(mean of the seeds) of each candidate of a comparison (benchmarks/recipes/conv_models.yaml), beside the
published figures, and the candidate that validation chooses across all the sets.

    python benchmarks/model_table.py --work runs/conv-ArrowHead runs/conv-OSULeaf ... --out benchmarks/results/cpu-conv-models.json

Each --work folder is one benchmarks/select_recipe.py selection (its selection.json and every run's
summary.json). This is a report, not a selection: the issue asks for every model's test figure beside
the others'. The choice of one default is made on validation alone (the mean over the sets of each
set's mean validation accuracy); test is read for the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import table

# (FCN, ResNet, InceptionTime, ROCKET, LSTM-FCN rerun): dl-4-tsc results-ucr-128.csv / results-mts.csv (means of
# runs), InceptionTime's and ROCKET's results csv, LSTM-FCN's train_loss_old_datasets.csv (checkpoints chosen on
# training loss). None: not published for that set.
PUBLISHED = {
    "ArrowHead": (0.843, 0.838, 0.846, 0.814, 0.897),
    "OSULeaf": (0.979, 0.980, 0.942, 0.941, 0.984),
    "PLAID": (0.904, 0.940, 0.944, 0.903, None),
    "PickupGestureWiimoteZ": (0.744, 0.704, 0.760, 0.830, None),
    "JapaneseVowels": (0.993, 0.992, None, None, None),
    "GunPoint": (1.0, 0.991, 1.0, 1.0, 1.0),
    "BasicMotions": (None, None, None, None, None),  # 1.0 for most published methods (UEA archive papers)
    "FSDD": (None, None, None, None, None),
}
PUBLISHED_NAMES = ("FCN", "ResNet", "InceptionTime", "ROCKET", "LSTM-FCN")


def collect(work: Path) -> dict:
    """{candidate: {val: [...], test: [...], seconds: [...]}} of one selection, seed by seed."""
    selection = json.loads((work / "selection.json").read_text())
    out: dict = {}
    for run in selection["runs"]:
        summary = json.loads((work / f"{run['candidate']}-seed{run['seed']}" / "summary.json").read_text())
        row = out.setdefault(run["candidate"], {"val": [], "test": [], "seconds": []})
        row["val"].append(summary["final_eval_accuracy"])
        row["test"].append(summary["test_accuracy"])
        row["seconds"].append(summary["wall_s"])
    return out


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", nargs="+", type=Path, required=True, help="selection folders, one per data set "
                   "(named conv-<data set> or <data set>)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    sets = {w.name.removeprefix("conv-"): collect(w) for w in args.work if (w / "selection.json").is_file()}
    if not sets:
        print("no finished selection (selection.json) in --work", file=sys.stderr)
        return 2
    candidates = list(next(iter(sets.values())))
    rows = []
    for name, found in sets.items():
        published = PUBLISHED.get(name, (None,) * 5)
        rows.append([name, *[f"{mean(found[c]['test'])} (val {mean(found[c]['val'])})" for c in candidates],
                     *["-" if v is None else v for v in published]])
    print(table("test accuracy, mean of the seeds (validation mean)", ["data set", *candidates, *PUBLISHED_NAMES], rows))
    # One default for every data set: the best mean over the sets of the per-set validation means.
    across = {c: mean([mean(found[c]["val"]) for found in sets.values()]) for c in candidates}
    chosen = max(across, key=across.get)
    print(f"validation across {len(sets)} sets: {across}; chosen: {chosen}")
    if args.out:
        args.out.write_text(json.dumps({"sets": sets, "validation_across_sets": across, "chosen": chosen,
                                        "published": {k: dict(zip(PUBLISHED_NAMES, v, strict=True))
                                                      for k, v in PUBLISHED.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
